"""MASUKA: start the studio.  `python app.py --help` lists every flag."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from masuka.web.server import ShareWithoutPassword, check_served_folder, check_share_policy, launch
    from masuka.settings import parse_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = parse_settings(argv)
        check_share_policy(settings)  # before any model loads or tunnel opens
        check_served_folder(settings)
    except (ValueError, ShareWithoutPassword) as exc:
        logging.getLogger("masuka").error("%s", exc)
        return 2
    launch(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
