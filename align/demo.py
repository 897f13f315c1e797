"""The CPU demo: build the tiny model and generate a sample image (replaced by the brand-adapter workflow)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="qwen-image-align CPU demo on a tiny random Qwen-Image.")
    parser.add_argument("--output_dir", default="outputs/demo", help="where the sample image is written")
    parser.add_argument("--prompt", default='a red sign that says "新品上市"')
    args = parser.parse_args(argv)
    from qwen_image import QwenImage

    model = QwenImage.tiny(seed=0)
    image = model.generate([args.prompt], height=64, width=64, num_inference_steps=8)[0]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "sample.png")
    model.save_pretrained(out / "tiny-qwen-image")
    print(f"sample image: {out / 'sample.png'}\ntiny checkpoint (diffusers layout): {out / 'tiny-qwen-image'}")


if __name__ == "__main__":
    main()
