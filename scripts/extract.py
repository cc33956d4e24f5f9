#!/usr/bin/env python
"""Extract semantic point tracks for a CSV of videos. See `semtrack.cli` and the README.

    python scripts/extract.py --csv_path videos.csv --weights random --make_vis
    python scripts/extract.py predict --config run.yaml --trainer.devices 8
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a plain checkout

from semtrack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
