"""``klotski-tier pack`` and ``klotski-tier verify``: write a packed expert store, and check one."""

from __future__ import annotations

from pathlib import Path

import click

from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.files import keep_out_of_the_demo
from klotski_tier.cli.params import NonEmptyPath
from klotski_tier.cli.progress import bytes_progress
from klotski_tier.core.errors import ConfigError, TierError
from klotski_tier.core.store import codec as codecs
from klotski_tier.core.store import pack as store_pack
from klotski_tier.core.store import packed as store
from klotski_tier.core.units import format_size


def _parse_compress(ctx: click.Context, param: click.Parameter, value: str) -> codecs.Codec:
    """``--compress`` as a :class:`Codec`; a bad value is a usage error that names the valid forms."""
    try:
        return codecs.parse_codec(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@click.command("pack")
@click.argument("model_dir", type=NonEmptyPath(path_type=Path))
@click.argument("out_dir", type=NonEmptyPath(path_type=Path))
@click.option(
    "--compress",
    default="none",
    show_default=True,
    callback=_parse_compress,
    metavar="none|zstd[:LEVEL]",
    help=f"Compress each block with zstd (LEVEL {codecs.ZSTD_MIN_LEVEL}-{codecs.ZSTD_MAX_LEVEL}, "
    f"default {codecs.ZSTD_DEFAULT_LEVEL}); 16-bit weights are byte-shuffled first.",
)
@report_errors
def pack(model_dir: Path, out_dir: Path, compress: codecs.Codec) -> None:
    """Rewrite the checkpoint MODEL_DIR as a packed expert store in OUT_DIR (which must not exist).

    Every block (attention or gate of a layer, one expert) is stored 4 KiB-aligned for O_DIRECT
    reads, with a checksum; the store is written atomically.
    """
    keep_out_of_the_demo({"OUT_DIR": out_dir})
    with bytes_progress("packing") as progress:
        summary = store_pack.pack(model_dir, out_dir, codec=compress, progress=progress)
    click.echo(format_summary(summary, compress))


def format_summary(summary: store.StoreSummary, codec: codecs.Codec) -> str:
    """The lines ``pack`` prints: blocks, raw and stored sizes, ratio and time."""
    compressed = f", {summary.compressed_blocks} of {summary.blocks} blocks compressed"
    return "\n".join(
        [
            f"packed {summary.path}",
            f"  blocks  {summary.blocks}",
            f"  raw     {format_size(summary.raw_bytes)}",
            f"  stored  {format_size(summary.stored_bytes)} (codec {codec}{compressed})",
            f"  ratio   {summary.ratio:.3f}",
            f"  time    {summary.elapsed_s:.2f} s",
        ]
    )


@click.command("verify")
@click.argument("store_dir", metavar="STORE", type=NonEmptyPath(path_type=Path))
@report_errors
def verify(store_dir: Path) -> None:
    """Check that the packed store STORE can run its model.

    Every block the model needs must be there, in range and shaped as the store's config says;
    then every block is read and its checksum, size and decoding are checked.
    """
    with bytes_progress("verifying") as progress:
        report = store.verify_store(store_dir, progress=progress)
    if not report.ok:
        block, problem = report.problems[0]
        raise TierError(
            f"store {report.path}: {len(report.problems)} of {report.blocks} blocks are bad, "
            f"the first is {block}, which {problem}; {store.REPACK_HINT}"
        )
    click.echo(f"ok: {report.blocks} blocks, {format_size(report.verified_bytes)} verified")
