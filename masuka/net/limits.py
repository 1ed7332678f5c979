"""How slow a download may be before it is given up; shared by settings, the LoRA library and transfers.

Kept apart (no imports) so reading the defaults never imports httpx.

A LoRA is at most 2 GiB by default (--lora-max-mb); 30 minutes lets that through at
1.2 MiB/s, far below what Colab gets from the Hub or Civitai. 50 KiB/s averaged
over 30 s is far below any working link, and far above a server that sends a byte
every few seconds to hold a download slot.
"""

DEFAULT_DOWNLOAD_TIMEOUT_S = 30 * 60.0  # overall, per download; 0 = no limit
DEFAULT_DOWNLOAD_MIN_RATE_KIB = 50.0  # KiB/s averaged over the window; 0 = no minimum
DEFAULT_RATE_WINDOW_S = 30.0  # the rate is first checked after one full window
