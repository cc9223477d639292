"""Copy the first N images per class of an image tar laid out <class>/<image> into a smaller tar."""

import sys
import tarfile
from collections import Counter

src, dest, per_class = sys.argv[1], sys.argv[2], int(sys.argv[3])
taken: Counter[str] = Counter()
with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
    for member in tin:
        parts = member.name.lstrip("./").split("/")
        if not member.isfile() or len(parts) < 2 or taken[parts[-2]] >= per_class:
            continue
        taken[parts[-2]] += 1
        tout.addfile(member, tin.extractfile(member))
print(f"{sum(taken.values())} images from {len(taken)} classes -> {dest}")
