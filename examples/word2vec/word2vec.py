"""TP4's Word2Vec experiment at laptop scale: CBOW word vectors at finite widths against their exact
muP limit and the kernel-regime (NTK, SP) limits, with gensim's Word2Vec as the anchor.

    pip install ".[examples]"        # gensim (its wheel ships the corpus and the benchmarks), matplotlib
    python examples/word2vec/word2vec.py [--corpus text8] [--widths 16,64,256,1024] [--seeds 2]
        [--no-gensim] [--no-limits] [--lr RATE] [--threads 1] [--out DIR] [--update-docs]
    python examples/word2vec/word2vec.py --quick        # 1000 words, 1 epoch: the same pipeline in under a minute
    python examples/word2vec/word2vec.py --data-only    # only data/tokens.npy and data/vocab.txt, for `tpc check`

Data: by default the Wikipedia excerpt in gensim's test data (markup stripped by gensim's
WikiCorpus, about 450k words); `--corpus FILE` takes any whitespace-separated text (text8 is TP4's
setting). The vocabulary is the program's: its embedding layer has V columns, so the V most frequent
words are kept and every other word is dropped from the stream, as gensim drops rare words. The
script writes data/tokens.npy (read by the .tp programs) and data/vocab.txt, then trains:
- tpc at each width and seed (word2vec_mup.tp), float32, the same data stream at every width;
- tpc's exact muP limit (each word vector a coefficient vector over the V initial embeddings);
- the NTK and SP limits (word2vec_ntk.tp, word2vec_sp.tp: the word vectors do not move);
- gensim's Word2Vec with the same settings (CBOW with summed context, cbow_mean=0, which is SGD on
  the same loss; window, negatives, subsampling, epochs, the same vocabulary) at each width.
Metrics, from each run's Gram matrix of word vectors: analogy accuracy on questions-words.txt
(3CosAdd; a question counts only when the answer's score is strictly the highest, so the limits'
ties count as wrong), Spearman correlation on wordsim353 and simlex999. Writes word2vec.png,
results.json and results.md (the table) to --out (default out/word2vec/, which git ignores), or
with --update-docs docs/word2vec.png and examples/word2vec/results.{json,md} (the README's).
--quick (or --vocabulary other than the programs' V) keeps its data under --out, not in data/.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

import tpc
from tpc.syntax import parse
from tpc.train import cbow
from tpc.train.limit import network_limit
from tpc.train.tables import train_tables

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/options.py
from options import add_output_options, fill_scale, output_paths  # noqa: E402 - found through the line above

PROGRAMS = {p: HERE / f"word2vec_{p}.tp" for p in ("mup", "ntk", "sp")}
# the README's scale, and --quick's (every value can still be set by its option; None: the programs')
FULL = {"widths": "16,64,256,1024", "seeds": 2, "vocabulary": None, "epochs": None}
QUICK = {"widths": "16,64,256", "seeds": 2, "vocabulary": 1000, "epochs": 1}
QUICK_NOTE = "quick run (--quick): a small-scale check of the pipeline; its numbers are not the README's"


def gensim_data() -> Path:
    try:
        import gensim
    except ImportError:
        sys.exit("this example needs gensim: pip install '.[examples]'")
    return Path(gensim.__file__).parent / "test" / "test_data"


def corpus(path: str | None) -> list[list[str]]:
    """Documents as lists of lowercase words."""
    if path:
        return [line.lower().split() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    from gensim.corpora.wikicorpus import WikiCorpus

    dump = gensim_data() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    logging.getLogger("gensim").setLevel(logging.WARNING)
    return list(WikiCorpus(str(dump), dictionary={}, processes=1).get_texts())


def vocabulary_size(program: Path) -> int:
    """The columns of the program's embedding layer, read from its syntax (its data may not exist yet)."""
    for s in parse(program.read_text(), str(program)).statements:
        if getattr(s, "role", None) == "embedding":
            return int(s.dims[1][0])
    raise SystemExit(f"{program}: no embedding layer")


def write_data(docs: list[list[str]], size: int, base: Path = HERE) -> list[str]:
    """base/data/tokens.npy (the stream over the `size` most frequent words) and base/data/vocab.txt."""
    counts = collections.Counter(w for d in docs for w in d)
    if len(counts) < size:
        raise SystemExit(f"the corpus has {len(counts)} distinct words; the programs need {size}")
    vocab = [w for w, _ in counts.most_common(size)]
    index = {w: i for i, w in enumerate(vocab)}
    tokens = np.array([index[w] for d in docs for w in d if w in index], dtype=np.int32)
    (base / "data").mkdir(parents=True, exist_ok=True)
    np.save(base / "data" / "tokens.npy", tokens)
    (base / "data" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return vocab


def load_programs(args: argparse.Namespace, size: int) -> dict[str, tpc.Network]:
    """The three programs, reading base/data/; a vocabulary other than their `size` (--quick) is
    put into their text, and --epochs / --lr into their training."""
    nets = {}
    for p, path in PROGRAMS.items():
        if args.vocabulary == size:
            net = tpc.load(path)
        else:  # every `size` in the program is the vocabulary's (the embedding's and readout's V, comments)
            text = re.sub(rf"\b{size}\b", str(args.vocabulary), path.read_text())
            net = tpc.loads(text, str(path), base_dir=args.base)
        if args.epochs:
            net.train.cbow.epochs = args.epochs
        if args.lr:
            net.train.lr = args.lr
        nets[p] = net
    return nets


# ---------------------------------------------------------------------------- evaluation


class Benchmarks:
    """The analogy questions and similarity pairs whose words are all in the vocabulary."""

    def __init__(self, vocab: list[str]) -> None:
        d = gensim_data()
        index = {w: i for i, w in enumerate(vocab)}
        rows, self.questions_total = [], 0
        for line in (d / "questions-words.txt").read_text().splitlines():
            if line.startswith(":") or not line.strip():
                continue
            self.questions_total += 1
            words = line.lower().split()
            if all(w in index for w in words):
                rows.append([index[w] for w in words])
        self.questions = np.array(rows, dtype=np.int64).reshape(-1, 4)
        self.pairs = {}
        for name, file in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
            pairs, total = [], 0
            for line in (d / file).read_text().splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                a, b, score = line.lower().split("\t")[:3]
                total += 1
                if a in index and b in index:
                    pairs.append((index[a], index[b], float(score)))
            self.pairs[name] = (np.array(pairs), total)

    def coverage(self) -> str:
        return (f"{len(self.questions)} of {self.questions_total} analogy questions, "
                + ", ".join(f"{len(p)} of {t} {k} pairs" for k, (p, t) in self.pairs.items()))

    def evaluate(self, gram: np.ndarray) -> dict[str, float]:
        g = torch.as_tensor(gram, dtype=torch.float64)
        norm = g.diagonal().clamp_min(1e-300).sqrt()
        cos = g / norm[:, None] / norm[None, :]
        correct = 0
        for chunk in torch.as_tensor(self.questions).split(512):
            a, b, c, d = chunk.T
            score = cos[:, b] - cos[:, a] + cos[:, c]  # 3CosAdd over unit vectors: (V, questions)
            cols = torch.arange(len(chunk))
            answer = score[d, cols].clone()
            for w in (a, b, c, d):
                score[w, cols] = -torch.inf
            correct += int((answer > score.max(0).values).sum())  # strictly best: ties are wrong
        out = {"analogy": correct / max(len(self.questions), 1)}
        for name, (pairs, _) in self.pairs.items():
            sims = cos[pairs[:, 0].astype(int), pairs[:, 1].astype(int)].numpy()
            rho = spearmanr(sims, pairs[:, 2]).statistic if np.ptp(sims) > 1e-9 else 0.0
            out[name] = float(rho)
        return out


# ---------------------------------------------------------------------------- runs


def run_tables(net: object, width: int | None, seed: int, label: str) -> np.ndarray:
    """The Gram matrix of `words` after the program's loop has trained its tables at `width` for
    `seed`, or in the exact limit (width None), in float32 (tpc run / limit would keep float64)."""
    if width is None:
        (u, v), factors = cbow.limit_tables(net, torch.float32), cbow.Factors.limit(net)
    else:
        (u, v), factors = cbow.finite_tables(net, width, seed, torch.float32), cbow.Factors.finite(net, width)
    with tqdm(total=cbow.stream(net).steps, desc=label, unit="step", leave=False, file=sys.stderr) as bar:
        train_tables(net, u, v, factors, lambda _done, _total: bar.update(1))
    return cbow.grams(net, u, v, width)["words"]


def gensim_model(net: object, words: list[str], width: int, seed: int, workers: int = 2) -> tuple[object, list]:
    """gensim's Word2Vec with the program's settings (CBOW, summed context), its vocabulary built
    from `words` (the token stream as strings) cut into gensim's longest sentences; and those."""
    from gensim.models import Word2Vec

    cfg = net.train.cbow
    sentences = [words[i:i + 10000] for i in range(0, len(words), 10000)]
    model = Word2Vec(vector_size=width, window=cfg.window, negative=cfg.negatives, sample=cfg.sample,
                     alpha=0.025, min_alpha=cfg.min_lr, sg=0, cbow_mean=0, hs=0, min_count=1, workers=workers,
                     seed=seed)
    model.build_vocab(sentences)
    return model, sentences


def run_gensim(net: object, vocab: list[str], width: int, seed: int, label: str = "gensim") -> np.ndarray:
    from gensim.models.callbacks import CallbackAny2Vec

    class Bar(CallbackAny2Vec):
        """gensim's epochs on a progress bar."""

        def __init__(self, bar: tqdm) -> None:
            self.bar = bar

        def on_epoch_end(self, _model: object) -> None:
            self.bar.update(1)

    model, sentences = gensim_model(net, np.array(vocab)[cbow.tokens_of(net)].tolist(), width, seed)
    with tqdm(total=net.train.cbow.epochs, desc=label, unit="epoch", leave=False, file=sys.stderr) as bar:
        model.train(sentences, total_examples=len(sentences), epochs=net.train.cbow.epochs, callbacks=[Bar(bar)])
    x = model.wv[vocab]
    return x @ x.T


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Without --update-docs nothing tracked by git is written.")
    ap.add_argument("--corpus", help="a whitespace-separated text file (e.g. text8) instead of gensim's excerpt")
    ap.add_argument("--widths", help=f"comma-separated widths (default {FULL['widths']}; --quick: {QUICK['widths']})")
    ap.add_argument("--seeds", type=int, help=f"seeds per width (default {FULL['seeds']}; --quick: {QUICK['seeds']})")
    ap.add_argument("--vocabulary", type=int, help="words kept (default the programs' V, 5000; --quick: "
                    f"{QUICK['vocabulary']}); another V writes its data under --out, not data/")
    ap.add_argument("--epochs", type=int,
                    help=f"training epochs (default the programs', 10; --quick: {QUICK['epochs']})")
    ap.add_argument("--no-gensim", action="store_true", help="skip gensim's Word2Vec anchor")
    ap.add_argument("--no-limits", action="store_true", help="finite widths (and gensim) only")
    ap.add_argument("--lr", type=float, help="tpc's learning rate instead of the programs' (a rate sweep)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: a step is small gathers and scatters, which two threads "
                         "slow down on a 2-core machine; see benchmarks/word2vec.py)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the same pipeline at a small scale (under a minute: "
                      "1000 words, 1 epoch, widths 16-256); its numbers are not the README's")
    mode.add_argument("--data-only", action="store_true",
                      help="write data/tokens.npy and data/vocab.txt (what the .tp programs load) and exit")
    add_output_options(ap, "word2vec", "word2vec.png, results.json and results.md",
                       "docs/word2vec.png and examples/word2vec/results.{json,md}")
    return ap


def resolve(ap: argparse.ArgumentParser, args: argparse.Namespace, size: int) -> argparse.Namespace:
    """Fill the scale from --quick or the README's defaults; the data folder and the output paths."""
    if args.data_only and args.vocabulary not in (None, size):
        ap.error(f"--data-only writes the programs' data: their vocabulary is {size} words")
    fill_scale(ap, args, QUICK, FULL, "figure and table")
    args.vocabulary = args.vocabulary or size
    if min(args.seeds, args.vocabulary, args.epochs or 1, args.threads, *args.width_list) < 1:
        ap.error("widths, --seeds, --vocabulary, --epochs and --threads must be positive")
    args.plot, args.stem = output_paths(args, "word2vec", HERE / "results")
    # the programs' data lives in data/; another vocabulary's beside the results (the programs load it from there)
    args.base = HERE if args.vocabulary == size else args.plot.parent.resolve()
    return args


def main() -> None:
    ap = parser()
    size = vocabulary_size(PROGRAMS["mup"])
    args = resolve(ap, ap.parse_args(), size)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.quick:
        print(QUICK_NOTE, flush=True)
    source = args.corpus or "gensim's Wikipedia excerpt"
    print(f"reading the corpus ({source}) ...", file=sys.stderr, flush=True)
    vocab = write_data(corpus(args.corpus), args.vocabulary, args.base)
    if args.data_only:
        print(f"wrote {args.base / 'data'}/tokens.npy and vocab.txt ({args.vocabulary} words) in "
              f"{time.time() - t0:.1f} s; now e.g. `tpc check examples/word2vec/word2vec_mup.tp`")
        return
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    widths = args.width_list
    bench = Benchmarks(vocab)
    nets = load_programs(args, size)
    mup = nets["mup"]
    print(f"corpus: {len(cbow.tokens_of(mup))} tokens over the {args.vocabulary} most frequent words; "
          f"{bench.coverage()}")
    print(f"limit: {cbow.describe(mup)}")

    results: dict = {"quick": args.quick, "vocabulary": args.vocabulary, "epochs": mup.train.cbow.epochs,
                     "tokens": int(len(cbow.tokens_of(mup))), "coverage": bench.coverage(),
                     "widths": widths, "seeds": args.seeds, "finite": {}, "gensim": {}, "limit": {}}
    if not args.no_limits:
        for p in ("ntk", "sp"):
            results["limit"][p] = bench.evaluate(network_limit(nets[p])["words"].value)
        t = time.time()
        results["limit"]["mup"] = bench.evaluate(run_tables(mup, None, 0, "muP limit"))
        results["limit_seconds"] = time.time() - t
        print(f"muP limit ({results['limit_seconds']:.0f} s): {results['limit']['mup']}", flush=True)
    for width in widths:
        runs, anchors = [], []
        t = time.time()
        for seed in range(args.seeds):
            runs.append(bench.evaluate(run_tables(mup, width, seed, f"n={width} seed {seed}")))
            if not args.no_gensim:
                anchors.append(bench.evaluate(run_gensim(mup, vocab, width, seed + 1, f"gensim n={width} seed {seed}")))
        results["finite"][width] = runs
        results["gensim"][width] = anchors
        print(f"width {width} ({time.time() - t:.0f} s): tpc {summary(runs)}" + (f"; gensim {summary(anchors)}"
                                                                                  if anchors else ""), flush=True)
    results["seconds"] = time.time() - t0
    args.stem.parent.mkdir(parents=True, exist_ok=True)
    args.stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    args.stem.with_suffix(".md").write_text((f"{QUICK_NOTE}\n\n" if args.quick else "") + table)
    print(table)
    plot(results, args.plot)
    print(f"wrote {args.stem}.json, {args.stem}.md and {args.plot} in {results['seconds']:.0f} s")
    if args.quick:
        print(QUICK_NOTE)


METRICS = (("analogy", "analogy accuracy (%)", 100.0), ("wordsim353", "wordsim353 Spearman", 1.0),
           ("simlex999", "simlex999 Spearman", 1.0))


def mean_ci(runs: list[dict], key: str) -> tuple[float, float]:
    x = np.array([r[key] for r in runs])
    return float(x.mean()), float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def summary(runs: list[dict]) -> str:
    return ", ".join(f"{k} {mean_ci(runs, k)[0] * s:.3g}" for k, _, s in METRICS)


def markdown(r: dict) -> str:
    head = "| run | " + " | ".join(label for _, label, _ in METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    rows = []
    for width in r["widths"]:
        for who, runs in (("tpc muP", r["finite"][width]), ("gensim", r["gensim"][width])):
            if runs:
                cells = []
                for k, _, s in METRICS:
                    m, ci = mean_ci(runs, k)
                    cells.append(f"{m * s:.2f} ± {ci * s:.2f}" if s > 1 else f"{m:.3f} ± {ci:.3f}")
                rows.append(f"| {who}, width {width} | " + " | ".join(cells) + " |")
    for p, name in (("mup", "muP limit (exact)"), ("ntk", "NTK limit"), ("sp", "SP limit")):
        if p not in r["limit"]:
            continue
        cells = [f"{r['limit'][p][k] * s:.2f}" if s > 1 else f"{r['limit'][p][k]:.3f}" for k, _, s in METRICS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    widths = r["widths"]
    for ax, (k, label, s) in zip(axes, METRICS, strict=True):
        m = np.array([mean_ci(r["finite"][w], k) for w in widths]) * s
        ax.errorbar(widths, m[:, 0], yerr=m[:, 1], marker="o", capsize=3, label="tpc, muP (finite width)")
        if r["gensim"][widths[0]]:
            g = np.array([mean_ci(r["gensim"][w], k) for w in widths]) * s
            ax.errorbar(widths, g[:, 0], yerr=g[:, 1], marker="s", capsize=3, ls="--", label="gensim Word2Vec")
        if r["limit"]:
            ax.axhline(r["limit"]["mup"][k] * s, color="C3", label="muP limit (exact)")
            ax.axhline(r["limit"]["ntk"][k] * s, color="k", ls=":", label="NTK and SP limits")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width n")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    quick = " (--quick: not the README's numbers)" if r.get("quick") else ""
    fig.suptitle(f"CBOW word2vec, {r['tokens']} tokens, {r['vocabulary']} words{quick}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
