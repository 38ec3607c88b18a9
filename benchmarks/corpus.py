"""Where the benchmarks find Tiny Shakespeare: the path given, the project's shared copy, or the
built-in corpus's download (pinned by sha256, cached), so a fresh clone runs them as they are."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
CACHE = Path.home() / ".cache" / "fundamentallm"


def shakespeare(given: Path | None) -> Path:
    """The path of tinyshakespeare.txt; exits with one line naming what was tried when there is none."""
    if given is not None:
        if not given.is_file():
            sys.exit(f"{given}: not found (give --shakespeare PATH, or `make bench SHAKESPEARE=PATH`)")
        return given
    if SHARED_SHAKESPEARE.is_file():
        return SHARED_SHAKESPEARE
    from fundamentallm.data.sources import iter_source
    from fundamentallm.errors import FundamentaLLMError

    target = CACHE / "tinyshakespeare.txt"
    if not target.is_file():
        print(f"tinyshakespeare.txt: not at {SHARED_SHAKESPEARE}; downloading the built-in corpus", flush=True)
        try:
            (document,) = iter_source("tinyshakespeare", cache_dir=CACHE / "downloads")
        except FundamentaLLMError as exc:
            sys.exit(
                f"tinyshakespeare.txt: not at {SHARED_SHAKESPEARE}, not downloadable ({exc}); give --shakespeare PATH"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(document.data)
    return target
