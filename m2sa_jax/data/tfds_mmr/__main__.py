"""Build the MMR TFDS dataset: ``python -m m2sa_jax.data.tfds_mmr --manual_dir M --data_dir D``."""

import argparse

import tensorflow_datasets as tfds

from m2sa_jax.data.tfds_mmr.mmr import SPLIT_FILES, Mmr


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manual_dir", required=True, help="folder with the MMR_*.json files (and images/)")
    parser.add_argument("--data_dir", required=True, help="where the array_record dataset is written")
    parser.add_argument("--image_dir", default=None, help="COCO images folder (default: manual_dir/images)")
    parser.add_argument("--splits", default=",".join(SPLIT_FILES), help="comma-separated subset of splits")
    args = parser.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    unknown = [s for s in splits if s not in SPLIT_FILES]
    if unknown:
        parser.error(f"unknown splits {unknown}; choose from {list(SPLIT_FILES)}")
    builder = Mmr(data_dir=args.data_dir, file_format="array_record", image_dir=args.image_dir, splits=splits)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
    print(f"built {builder.data_dir}: " + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()))


if __name__ == "__main__":
    main()
