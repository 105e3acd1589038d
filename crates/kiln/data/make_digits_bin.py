#!/usr/bin/env python3
"""Build digits.bin from scikit-learn's copy of the UCI ML hand-written digits data.

Source: sklearn/datasets/data/digits.csv.gz inside a scikit-learn wheel (a zip),
which is the test set of "Optical Recognition of Handwritten Digits"
(E. Alpaydin, C. Kaynak, 1998), UCI Machine Learning Repository, CC BY 4.0.

Output format: 1797 rows x 65 bytes, row-major, one u8 per value:
64 pixel values (8x8 image, row-major, 0..16) followed by the label (0..9),
rows in the CSV's order. No header.

Usage (python3 stdlib only):
    python3 make_digits_bin.py scikit_learn-*.whl [out.bin]
    python3 make_digits_bin.py digits.csv.gz      [out.bin]
The default output is digits.bin next to this script.
"""
import csv
import gzip
import io
import os
import sys
import zipfile

MEMBER = "sklearn/datasets/data/digits.csv.gz"
ROWS, COLS = 1797, 65


def read_csv_gz_bytes(path):
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(MEMBER)
    with open(path, "rb") as f:
        return f.read()


def main(argv):
    if len(argv) not in (2, 3):
        sys.exit(__doc__)
    src = argv[1]
    out = argv[2] if len(argv) == 3 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.bin")
    text = gzip.decompress(read_csv_gz_bytes(src)).decode("ascii")
    buf = bytearray()
    nrows = 0
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        if len(row) != COLS:
            sys.exit(f"row {nrows}: expected {COLS} values, got {len(row)}")
        vals = []
        for s in row:
            v = float(s)
            if v != int(v):
                sys.exit(f"row {nrows}: non-integer value {s!r}")
            vals.append(int(v))
        if not all(0 <= p <= 16 for p in vals[:64]) or not 0 <= vals[64] <= 9:
            sys.exit(f"row {nrows}: value out of range")
        buf.extend(vals)
        nrows += 1
    if nrows != ROWS:
        sys.exit(f"expected {ROWS} rows, got {nrows}")
    with open(out, "wb") as f:
        f.write(buf)
    hist = [0] * 10
    for r in range(ROWS):
        hist[buf[r * COLS + 64]] += 1
    print(f"wrote {out}: {len(buf)} bytes ({nrows} rows x {COLS})")
    print("label histogram:", {d: hist[d] for d in range(10)})
    print("max pixel:", max(buf[r * COLS + c] for r in range(ROWS) for c in range(64)))
    print("first row:", list(buf[:COLS]))


if __name__ == "__main__":
    main(sys.argv)
