"""Write `notes/`: 24 text files (117,000 characters of CPython's reference topics, present
wherever Python is), the folder of notes the documentation's examples train on.

    python examples/make_notes.py [DIR]
"""

import sys
from pathlib import Path
from pydoc_data.topics import topics

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "notes")
folder.mkdir(parents=True, exist_ok=True)
for name in sorted(topics)[:24]:
    (folder / f"{name}.txt").write_text(topics[name], encoding="utf-8")
print(f"{folder}/: 24 text files, {sum(len(topics[n]) for n in sorted(topics)[:24]):,} characters")
