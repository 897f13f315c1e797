"""Print OCR reward timings on CPU: engine load, then median seconds per image at several sizes.

    python benchmarks/rewards_speed.py [--repeats 5] [--threads -1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rewards import OcrReward, get_ocr_engine
from rewards.render import render_text

TEXT = "新品上市 Latte 拿铁 门迎春夏秋冬福"
CASES = [
    ("512x512, 1 line", (512, 512), TEXT.replace(" ", ""), 28),
    ("512x512, 3 lines", (512, 512), "新品上市\nLatte 拿铁\n门迎春夏秋冬福", 44),
    ("1024x1024, 3 lines", (1024, 1024), "新品上市\nLatte 拿铁\n门迎春夏秋冬福", 90),
    ("1328x1328, 3 lines", (1328, 1328), "新品上市\nLatte 拿铁\n门迎春夏秋冬福", 110),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=-1)
    args = ap.parse_args()
    t = time.perf_counter()
    get_ocr_engine(num_threads=args.threads)
    print(f"engine created: {time.perf_counter() - t:.3f} s (models load lazily on the first image)")
    reward = OcrReward(num_threads=args.threads)
    for name, size, text, fs in CASES:
        img = render_text(text, size=size, font_size=fs)
        prompt = f'"{text}"'
        t = time.perf_counter()
        score = reward([prompt], [img])[0]
        first = time.perf_counter() - t
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            reward([prompt], [img])
            times.append(time.perf_counter() - t)
        print(f"{name:22s} reward={score:.3f} first={first:.3f}s median={statistics.median(times):.3f}s "
              f"min={min(times):.3f}s")
        print(f"METRIC\tocr reward: {name}\t{statistics.median(times):.3f}\ts/image")


if __name__ == "__main__":
    main()
