"""The command line: a thin click layer over one module per verb. Heavy imports happen inside commands
so that `lora2gguf --help` starts fast."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from pathlib import Path

import click

from lora2gguf import __version__
from lora2gguf.allocator import keep_freed_memory
from lora2gguf.errors import Lora2GGUFError, Terminated


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """ADAPTER[:SCALE] → (path, scale); a path that itself contains ':' is taken whole when it exists."""
    path, sep, tail = arg.rpartition(":")
    if not sep or (Path(arg).exists() and not Path(path).exists()):
        return arg, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise Lora2GGUFError(f"--lora {arg}: scale {tail!r} is not a number; write ADAPTER or ADAPTER:SCALE, "
                             "e.g. my-adapter:0.5") from None
    if not math.isfinite(scale):
        raise Lora2GGUFError(f"--lora {arg}: scale must be a finite number")
    return path, scale


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
    from lora2gguf.commands.inspect import describe, format_description

    info = describe(path, base=base)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@cli.command("verify")
@click.option("--base", required=True, type=click.Path(), help="The GGUF base llama.cpp serves.")
@click.option("--lora", "loras", multiple=True, required=True, metavar="ADAPTER[:SCALE]",
              help="GGUF LoRA file or PEFT directory, optionally with a scale (repeatable).")
@click.option("--merged", type=click.Path(), help="A merged GGUF to check against the same reference.")
@click.option("--runtime-lora", type=click.Path(), help="Check this GGUF LoRA (made by any tool) against "
              "the PEFT directory given as --lora, instead of converting it on the fly.")
@click.option("--text", "text_file", type=click.Path(), help="Text file to evaluate (default: a built-in passage).")
@click.option("--prompts", "prompts_file", type=click.Path(), help="JSONL of chat messages for greedy checks.")
@click.option("--chat-template", help="For --prompts when the GGUF has no chat template: chatml, gemma or a Jinja file.")
@click.option("--tokens", "n_tokens", default=256, show_default=True, help="Tokens of text to evaluate.")
@click.option("--max-kl", type=float, help="Override every mean-KL threshold.")
@click.option("--imatrix", type=click.Path(), help="The importance matrix MERGED was quantized with, where the "
              "path it records is gone (its floors are measured with the same matrix).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
@click.pass_context
def verify_cmd(ctx, base, loras, merged, runtime_lora, text_file, prompts_file, chat_template, n_tokens, max_kl,
               imatrix, as_json):
    """Prove parity: reference (PyTorch, PEFT math) vs llama.cpp runtime LoRA vs merged file.
    Exit 0 when every pair is within its threshold, 1 when not, 2 on bad input."""
    from lora2gguf.commands.verify import format_report, read_prompts, read_text, verify

    report = verify(base, [parse_lora_arg(a) for a in loras], merged=merged, runtime_lora=runtime_lora,
                    text=read_text(text_file) if text_file else None,
                    prompts=read_prompts(prompts_file) if prompts_file else None, chat_template=chat_template,
                    n_tokens=n_tokens, max_kl=max_kl, verbose=ctx.obj["verbose"], imatrix=imatrix)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    ctx.exit(0 if report["pass"] else 1)


@cli.command("merge")
@click.option("--base", required=True, type=click.Path(), help="Base model .gguf (any type: F32, F16, Q8_0, K-quants...).")
@click.option("--lora", "loras", required=True, multiple=True, metavar="ADAPTER[:SCALE]",
              help="PEFT adapter dir or GGUF LoRA file, scale 1.0 by default; repeat for several.")
@click.option("--quant", default="f16", show_default=True, metavar="TYPE",
              help="Output type: f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ... (llama.cpp's file types).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Merged GGUF file to write.")
@click.option("--imatrix", type=click.Path(), default=None,
              help="Importance matrix from llama-imatrix (GGUF or legacy .dat), used as llama-quantize --imatrix.")
@click.option("--imatrix-data", is_flag=False, flag_value="adapter", default=None, metavar="[DATA]",
              help="Measure the importance matrix on the merged model over DATA (JSONL in the train formats, or "
                   "text); alone: each adapter's own training data. Needed for iq2_xs, iq1_s, q2_k_s...")
@click.option("--imatrix-out", type=click.Path(), default=None,
              help="Where --imatrix-data writes the matrix (llama.cpp's GGUF form) [default: OUT.imatrix.gguf].")
@click.option("--chat-template", help="For --imatrix-data conversations when the GGUF has no chat template: chatml, "
              "gemma or a Jinja file (default for an adapter's own data: the template it was trained with).")
@click.option("--threads", type=int, default=None, help="Threads for llama.cpp's quantizer (default: all).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.pass_context
def merge_cmd(ctx: click.Context, base: str, loras: tuple[str, ...], quant: str, out: str, imatrix: str | None,
              imatrix_data: str | None, imatrix_out: str | None, chat_template: str | None, threads: int | None,
              force: bool) -> None:
    """Bake LoRA adapters into a GGUF base and write it at any llama.cpp quantization."""
    from lora2gguf.commands.merge import merge

    pairs = [parse_lora_arg(a) for a in loras]
    out_path = merge(base, pairs, out, quant=quant, threads=threads, force=force, verbose=ctx.obj["verbose"],
                     imatrix=imatrix, imatrix_data=imatrix_data, imatrix_out=imatrix_out, chat_template=chat_template)
    click.echo(f"wrote {out_path}")


@cli.command("train")
@click.option("--base", required=True, type=click.Path(), help="Base model: a .gguf (any quantization) or an HF dir.")
@click.option("--data", required=True, type=click.Path(), help="JSONL: text, prompt/completion or messages.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Adapter directory to write (PEFT format).")
@click.option("--eval-data", type=click.Path(), help="JSONL evaluated during training (eval loss in the log).")
@click.option("--tokenizer", type=click.Path(), help="GGUF whose tokenizer to use (needed for an HF-dir base).")
@click.option("--chat-template", help="For messages records when the GGUF has no chat template (a pretrained "
              "base): chatml, gemma, or a Jinja file. Default: the GGUF's own template.")
@click.option("--rank", default=16, show_default=True)
@click.option("--alpha", default=32.0, show_default=True)
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(rank) instead of alpha/rank.")
@click.option("--dropout", default=0.05, show_default=True)
@click.option("--targets", default="all-linear", show_default=True, help="all-linear or e.g. q_proj,v_proj; on a mixture of experts also "
              "experts and gate (the router, not in all-linear).")
@click.option("--layers", help="Adapt only these layers, e.g. 20-29 (PEFT's layers_to_transform); the layers "
              "below the first one get no backward pass, so training is faster. Default: all.")
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--steps", type=int, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, help="Epochs instead of --steps.")
@click.option("--batch-size", default=4, show_default=True, help="Sequences per micro-batch, all processes together.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seq-len", default=1024, show_default=True, help="Longer sequences are truncated (with a warning).")
@click.option("--warmup", type=int, help="Warmup steps before the cosine decay (default: 3% of the run).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
              help="auto: bf16 autocast on CUDA, fp32 elsewhere.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in backward: less memory, more time.")
@click.option("--base-weights", default="auto", show_default=True, type=click.Choice(["auto", "resident", "quantized"]),
              help="Where the frozen GGUF base lives: resident (dequantized once; fastest), quantized (the file's "
              "own blocks, dequantized block by block in each pass: memory ≈ the file). auto: resident when it "
              "takes at most half the free memory.")
@click.option("--seed", default=0, show_default=True)
@click.option("--save-every", default=0, show_default=True, help="Checkpoint every N steps (0: only on Ctrl-C or SIGTERM).")
@click.option("--resume", is_flag=True, help="Continue from the latest OUT/checkpoint-<step>.")
@click.option("--gguf", type=click.Path(), help="Also convert the adapter to this GGUF LoRA file at the end.")
@click.option("--gguf-outtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
              help="Tensor type of the --gguf file (f16 halves it at no measurable cost).")
@click.option("--force", is_flag=True, help="Start over in an existing OUT; overwrite an existing --gguf.")
def train_cmd(**kwargs) -> None:
    """Train a LoRA adapter on the weights and tokenizer of a GGUF base (works under torchrun too).

    The loss covers text, completions and assistant turns (chat rendered with the GGUF's template).
    Batches are padded with an attention mask, not packed. Ctrl-C or SIGTERM saves a checkpoint; --resume
    continues."""
    from lora2gguf.commands.train import TrainConfig, train

    result = train(TrainConfig(**kwargs))
    if result.rank == 0:
        loss = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
        click.echo(f"wrote {result.out} ({result.steps} steps{loss})" + (f" and {result.gguf}" if result.gguf else ""))


@cli.command("convert")
@click.argument("adapter_dir", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="Base model: a .gguf (preferred) or an HF dir / config.json.")
@click.option("-o", "--out", required=True, type=click.Path(), help="GGUF LoRA file to write.")
@click.option("--outtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0"]))
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert_cmd(adapter_dir: str, base: str, out: str, outtype: str, force: bool) -> None:
    """Convert an adapter directory (PEFT, torchtune, mlx-lm) into a GGUF LoRA for llama.cpp's --lora."""
    from lora2gguf.commands.convert import convert

    click.echo(f"wrote {convert(adapter_dir, base, out, outtype=outtype, force=force)}")


@cli.command("export")
@click.argument("adapter_gguf", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="The base model the adapter is for (.gguf or HF dir).")
@click.option("-o", "--out", required=True, type=click.Path(), help="PEFT adapter directory to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it is an existing adapter directory.")
def export_cmd(adapter_gguf: str, base: str, out: str, force: bool) -> None:
    """Turn a GGUF LoRA (or a torchtune / mlx-lm adapter) into a PEFT adapter directory."""
    from lora2gguf.commands.export import export

    click.echo(f"wrote {export(adapter_gguf, base, out, force=force)}")


@cli.command("demo")
@click.option("--workdir", default="demo-out", show_default=True, type=click.Path(), help="Where outputs go.")
@click.option("--base", type=click.Path(), help="A GGUF base, or smollm2 (SmolLM2-135M-Instruct, the default) or gemma3 "
              "(Gemma 3 270M, a pretrained base), downloaded once.")
@click.option("--steps", default=20, show_default=True, help="Training steps per adapter (trade quality for time).")
@click.option("--json", "as_json", is_flag=True, help="Also print the summary as one JSON object on stdout.")
def demo_cmd(workdir: str, base: str | None, steps: int, as_json: bool) -> None:
    """Train two adapters, convert, hot-swap, merge to q4_k_m, verify: the whole pipeline on a real model."""
    from lora2gguf.demo import Recipe, format_summary, run_demo

    summary = run_demo(workdir, base=base, recipe=Recipe(steps=steps), log=lambda m: click.echo(m, err=as_json))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_summary(summary))


@cli.command("modelfile")
@click.option("--merged", type=click.Path(), help="A merged GGUF (lora2gguf merge): FROM it. Any Ollama.")
@click.option("--base", type=click.Path(), help="With --adapter: the GGUF base.")
@click.option("--lora", type=click.Path(), help="With --adapter: the GGUF LoRA adapter.")
@click.option("--adapter", is_flag=True, help="FROM base + ADAPTER lora, for Ollama before 0.34.1 (later ones "
              "refuse ADAPTER at `ollama create`).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Modelfile to write.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def modelfile_cmd(merged: str | None, base: str | None, lora: str | None, adapter: bool, out: str, force: bool) -> None:
    """Write an Ollama Modelfile (then `ollama create NAME -f OUT`): FROM a merged GGUF, or with --adapter
    FROM base + ADAPTER lora."""
    from lora2gguf.commands.modelfile import ADAPTER_NOTE, write_modelfile

    click.echo(f"wrote {write_modelfile(out, merged, base, lora, adapter, force=force)}")
    if adapter:
        click.echo(f"note: {ADAPTER_NOTE}", err=True)


@cli.command("analyze")
@click.argument("adapter", type=click.Path())
@click.option("--base", type=click.Path(), help="The base model: norms relative to its weights (needed for nothing else).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with every singular value).")
@click.option("--plot", "plot_out", type=click.Path(), help="Write a layer × module heatmap PNG (needs matplotlib).")
def analyze_cmd(adapter: str, base: str | None, as_json: bool, plot_out: str | None) -> None:
    """How many of its r dimensions an adapter's update really uses, per layer and module."""
    from lora2gguf.commands.analyze import analyze, format_report, plot

    report = analyze(adapter, base)
    if plot_out:
        plot(report, plot_out)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def _target_options(f):
    f = click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖_F² (e.g. 0.99).")(f)
    return click.option("--rank", type=int, help="Rank K for every module (fewer where the update has fewer).")(f)


@cli.command("resize")
@click.argument("adapter", type=click.Path())
@_target_options
@click.option("-o", "--out", required=True, type=click.Path(), help="OUT.gguf (GGUF LoRA, needs --base) or a PEFT directory.")
@click.option("--base", type=click.Path(), help="The base model (for a GGUF output, or to check the adapter against).")
@click.option("--outtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0"]))
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def resize_cmd(adapter, rank, energy, out, base, outtype, force) -> None:
    """Truncate each module's update optimally (SVD) to --rank K or to --energy E."""
    from lora2gguf.commands.resize import format_report, resize

    click.echo(format_report(resize(adapter, out, rank=rank, energy=energy, base=base, outtype=outtype, force=force)))


@cli.command("combine")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:SCALE]...")
@click.option("--base", required=True, type=click.Path(), help="The base model the adapters are for.")
@click.option("-o", "--out", required=True, type=click.Path(), help="GGUF LoRA file to write.")
@click.option("--rank", type=int, help="Recompress each summed module to this rank by SVD (default: exact, ranks add).")
@click.option("--outtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0"]))
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def combine_cmd(adapters, base, out, rank, outtype, force) -> None:
    """Sum adapters (each times its SCALE) into one GGUF LoRA that llama.cpp loads as a single adapter."""
    from lora2gguf.commands.combine import combine, format_report

    click.echo(format_report(combine([parse_lora_arg(a) for a in adapters], base, out, rank=rank, outtype=outtype,
                                     force=force)))


@cli.command("extract")
@click.option("--base", required=True, type=click.Path(), help="The base model (GGUF of any type, or an HF dir).")
@click.option("--tuned", required=True, type=click.Path(), help="The fully fine-tuned model (GGUF or HF dir).")
@_target_options
@click.option("-o", "--out", required=True, type=click.Path(), help="OUT.gguf (GGUF LoRA) or a PEFT directory.")
@click.option("--outtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0"]))
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def extract_cmd(base, tuned, rank, energy, out, outtype, force) -> None:
    """Build a LoRA from a full fine-tune: per weight, the truncated SVD of tuned − base."""
    from lora2gguf.commands.extract import extract, format_report

    click.echo(format_report(extract(base, tuned, out, rank=rank, energy=energy, outtype=outtype, force=force)))


TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _terminate(signum, frame) -> None:
    """SIGTERM/SIGHUP (kill, a closed terminal, a job scheduler) by default end the process on the spot,
    leaving a hidden temp output behind. Raised as Terminated instead, they take Ctrl-C's clean-up path.
    A second signal while that runs ends the process at once."""
    for s in TERMINATING:
        signal.signal(s, signal.SIG_DFL)
    raise Terminated(signum)


def _catch_termination():
    """Install _terminate (main thread only: Python delivers signals there); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.signal(s, _terminate) for s in TERMINATING}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input → `error: <one line>` on stderr and exit 2 (traceback only with -v)."""
    if argv is None:  # the process is ours (the console script, python -m): set its heap policy
        keep_freed_memory()
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    restore = _catch_termination()
    try:
        rc = cli.main(args=args, prog_name="lora2gguf", standalone_mode=False)
    except Lora2GGUFError as e:
        if verbose:
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (so Terminated too) into Abort
        if isinstance(e.__context__, Terminated):
            click.echo(f"terminated by {signal.Signals(e.__context__.signum).name}", err=True)
            return 128 + e.__context__.signum
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as e:  # one line too, with where to look
        cmd = e.ctx.command_path if e.ctx is not None else "lora2gguf"
        click.echo(f"error: {e.format_message()} (see '{cmd} --help')", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except Terminated as e:
        click.echo(f"terminated by {signal.Signals(e.signum).name}", err=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    finally:
        restore()
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
