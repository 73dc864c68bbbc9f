"""Write the ``sizes.json`` of existing caption shards: ``{"shard-00000.tar": 10000, ...}``.

``CaptionShards`` without ``resampled`` deals samples out over ranks exactly once and needs every
shard's sample count. It reads them from the ``sizes.json`` in the shards' folder; local shards
without one are counted at start-up (a scan of the tar headers), remote ones (``s3://``,
``https://``, ...) are an error. This writes the file once (merging with an existing one); local
shards are scanned header by header, remote ones are read in full.

    python data_recipes/shard_sizes.py 'data/cc3m/{00000..00331}.tar'
    python data_recipes/shard_sizes.py 's3://bucket/shards/shard-{00000..00099}.tar' --out sizes.json

Needs ``llava_lightning`` installed (run with the project's Python).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("urls", nargs="+", help="shard paths or URLs, brace-expanded ('shard-{00000..00009}.tar')")
    p.add_argument("--out", help="where to write (default: sizes.json in the first shard's folder)")
    return p.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    from llava_lightning.data.captions import _sizes_file, expand_urls, write_sizes

    args = parse_args(argv)
    urls = expand_urls(args.urls)
    table = write_sizes(urls, args.out)
    counted = sum(table[u.rsplit("/", 1)[-1]] for u in urls)
    print(f"shard_sizes: {len(urls)} shards, {counted} samples -> {args.out or _sizes_file(urls[0])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
