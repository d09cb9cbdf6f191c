"""The command line: a thin click layer over one module per verb. Heavy imports happen inside commands
so that `lora2gguf --help` starts fast."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import Lora2GGUFError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora2gguf")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and llama.cpp's own log.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Train, convert, merge and verify LoRA adapters for GGUF models (llama.cpp, Ollama)."""
    ctx.obj = {"verbose": verbose}


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=True))
@click.option("--base", type=click.Path(exists=True), help="For an adapter: check it against this base.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(path: str, base: str | None, as_json: bool) -> None:
    """Describe a GGUF model or adapter (or an HF model / PEFT adapter directory)."""
    from .inspector import describe, format_description

    info = describe(path, base=base)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input → `error: <one line>` on stderr and exit 2 (traceback only with -v)."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    try:
        cli.main(args=args, prog_name="lora2gguf", standalone_mode=False)
    except Lora2GGUFError as e:
        if verbose:
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
