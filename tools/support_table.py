"""Print the README's support table: which UNet classes work in which fxprop mode.

Runs the tiny model builders of ``tests/test_models.py`` (the ones the tests use). A cell is
"yes" when, in that mode, the split composes to the whole UNet (1e-5), a 3-step generation with
every step a key step equals plain sampling (1e-5), and a sparse 3-step generation runs without
falling back to the whole UNet and differs from plain sampling (features really were reused);
parallel mode must also equal sequential mode on that plan. The deep column cuts at branch 0,
the shallowest skip (found from the graph, see ``fxprop/deep.py``). Otherwise the cell says
"no" with a footnote giving the first words of the error.

    python tools/support_table.py                  # every model, Markdown on stdout
    python tools/support_table.py --only LDM SVD   # rows whose name contains a word
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from test_models import (MODELS, Model, check_model, generate, max_diff,  # noqa: E402
                         sparse_generation, unet_of)

TIMESTEPS = torch.tensor([900, 500, 100])
KEYS = [0]
#: column -> options of fxprop.accelerate
MODES = {
    "encoder (sequential)": {},
    "encoder (parallel)": {"parallel": True},
    "deep": {"reuse": "deep"},
}


def check_cell(model: Model, unet: torch.nn.Module, options: dict) -> str | None:
    """None if ``model`` works in the mode of ``options``, else why not."""
    try:
        check_model(model, unet, TIMESTEPS, **options)
        sparse = sparse_generation(model, unet, KEYS, TIMESTEPS, **options)
        plain = generate(model, unet, TIMESTEPS)
        if max_diff(sparse, plain) <= 1e-6:
            return "a sparse generation equals plain sampling: nothing was reused"
        if options.get("parallel"):
            error = max_diff(sparse, sparse_generation(model, unet, KEYS, TIMESTEPS))
            if error > 1e-5:
                return f"parallel differs from sequential by {error:.2g}"
        return None
    except Exception as err:  # any failure is a "no" cell, with its reason
        return _short(str(err).splitlines()[0] if str(err) else type(err).__name__)


def _short(text: str, words: int = 24) -> str:
    cut = text.split()
    return " ".join(cut[:words]) + (" ..." if len(cut) > words else "")


def table(names: list[str]) -> str:
    """The Markdown table, failures as footnotes below it."""
    rows = ["| model | " + " | ".join(MODES) + " |", "|---" * (len(MODES) + 1) + "|"]
    notes: list[str] = []
    for name in names:
        model, start = MODELS[name], time.perf_counter()
        unet, cells = unet_of(model), []
        for mode, options in MODES.items():
            reason = check_cell(model, unet, options)
            if reason is not None:
                notes.append(f"{len(notes) + 1}. {name}, {mode}: `{reason}`")
            cells.append("yes" if reason is None else f"no ({len(notes)})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return "\n".join(rows + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="words of model names to keep")
    args = parser.parse_args()
    names = [n for n in MODELS if not args.only or any(w in n for w in args.only)]
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(table(names))  # one UNet per builder: its runtimes share its captures


if __name__ == "__main__":
    main()
