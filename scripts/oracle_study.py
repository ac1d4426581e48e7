"""How biased is each estimator, exactly? The oracle (`timsim.exact`) on configs/oracle.yaml's
enumerable task, for 5 pretrained bases (pretrain.seed 0..4) x Gaussian logit noise at scale
0 (zero mismatch), 0.5, 1 and 2 x fresh and context-keyed (persistent) noise; fresh noise is
averaged over 8 draws. One row per (base, mode, scale, estimator) into a Parquet file; then the
Markdown tables of docs/results/oracle-bias-cpu.md.

    python scripts/oracle_study.py docs/results/oracle-bias-cpu.parquet          # ~25 min, 2 cores
    python scripts/oracle_study.py --report docs/results/oracle-bias-cpu.parquet
    python scripts/oracle_study.py --finite-group docs/results/oracle-finite-group-cpu.parquet   # ~5 min
    python scripts/oracle_study.py --claim docs/results/oracle-bypass-recompute-cpu.parquet      # ~6 min
    python scripts/oracle_study.py --claim-report docs/results/oracle-bypass-recompute-cpu.parquet
    python scripts/oracle_study.py --ranking docs/results/oracle-bias-cpu.parquet
"""
import sys
import time

import numpy as np
import pandas as pd

import timsim
from timsim import exact, hyper
from timsim.base import get_base
from timsim.store import provenance
from timsim.summary import ci_half_width

BASES, SCALES, MODES, DRAWS = range(5), (0.0, 0.5, 1.0, 2.0), ("fresh", "context"), 8
SHOWN = ["recompute", "bypass", "recompute+token_tis", "recompute+seq_tis", "recompute+token_mis", "recompute+cis",
         "recompute+prefix_is", "recompute+minpro", "bypass+seq_mask", "bypass+kl_rejection", "bypass+geometric",
         "bypass+offpolicy_mask", "recompute+score_centering", "bypass*token_tis (double count)",
         "bypass*seq_tis (double count)", "zero mismatch"]


def write(frame: pd.DataFrame, out: str, command: str) -> None:
    """The table to Parquet with its provenance and the command that regenerates it
    (`pandas.read_parquet(out).attrs`)."""
    frame.attrs = {"command": command, "provenance": provenance()}
    frame.to_parquet(out)


def run(out: str) -> None:
    """One compiled oracle per noise mode, reused for every base and scale (both traced or data)."""
    timsim.setup()
    frames = []
    for mode in MODES:
        cfg = timsim.load_config("configs/oracle.yaml", [f"perturbation.logit_noise.mode={mode}"])
        graphdef = get_base(cfg, announce=print)[0]
        oracle = exact.make_oracle(cfg, graphdef)
        for base in BASES:
            params = get_base(cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"seed": base})}),
                              announce=print)[1]
            for scale in SCALES:
                if scale == 0 and mode == "context":
                    continue  # zero mismatch has no mode
                start = time.time()
                at = timsim.load_config("configs/oracle.yaml", [f"perturbation.logit_noise.mode={mode}",
                                                                 f"perturbation.logit_noise.scale={scale}"])
                table, facts = exact.evaluate(oracle, at, params, params, hyper.of(at), 0, DRAWS if scale else 1)
                frames.append(table.assign(base=base, mode=mode, scale=scale, draws=facts["draws"]))
                print(f"base {base} {mode} scale {scale}: {time.time() - start:.0f} s", flush=True)
                write(pd.concat(frames), out, f"python scripts/oracle_study.py {out}")  # every finished cell is kept


def _mean_ci(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.3f} ± {ci_half_width(values):.3f}"


def report(path: str) -> None:
    data = pd.read_parquet(path)
    levels = [s for s in SCALES if s > 0]
    print("Relative bias |E[g] - g0| / |g0| (mean ± 95% CI over the 5 bases):\n")
    for mode in MODES:
        print(f"\n{mode} noise\n")
        print("| estimator | " + " | ".join(f"sigma {s:g}" for s in levels) + " |")
        print("|---|" + "---|" * len(levels))
        for name in SHOWN[:-1]:
            cells = [data[(data["mode"] == mode) & (data.scale == s) & (data.estimator == name)].rel_bias for s in levels]
            print(f"| {name} | " + " | ".join(_mean_ci(c) for c in cells) + " |")
    print("\nCosine to the true gradient grad E_pi[R]:\n")
    for mode in MODES:
        print(f"\n{mode} noise\n")
        print("| estimator | sigma 0 | " + " | ".join(f"sigma {s:g}" for s in levels) + " |")
        print("|---|---|" + "---|" * len(levels))
        for name in SHOWN:
            zero = data[(data.scale == 0) & (data.estimator == name)].cos_true
            cells = [data[(data["mode"] == mode) & (data.scale == s) & (data.estimator == name)].cos_true
                     for s in levels]
            print(f"| {name} | {_mean_ci(zero)} | " + " | ".join(_mean_ci(c) for c in cells) + " |")
    print("\nBypass (PPO clip) minus recompute, relative bias, paired by base (mean ± 95% CI):\n")
    print("| mode | " + " | ".join(f"sigma {s:g}" for s in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for mode in MODES:
        cells = []
        for s in levels:
            cell = data[(data["mode"] == mode) & (data.scale == s)].pivot(index="base", columns="estimator",
                                                                            values="rel_bias")
            cells.append(_mean_ci(cell["bypass"] - cell["recompute"]))
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print("\nPer-sample variance (tr Cov of one response's update), sigma 1, relative to zero mismatch's:\n")
    for mode in MODES:
        cell = data[(data["mode"] == mode) & (data.scale == 1.0)].pivot(index="base", columns="estimator",
                                                                          values="variance")
        ratio = cell.div(cell["zero mismatch"], axis=0)
        print(f"{mode}: " + ", ".join(f"{n} {_mean_ci(ratio[n])}" for n in SHOWN[:-1]))


def finite_group_gap(out: str, batches: int = 400) -> None:
    """The oracle's G -> infinity limit against the real step at finite group size G: the real
    loss's gradient (make_collect, learner_batch, make_loss) averaged over `batches` sampled
    batches, for the default estimator (PPO, zscore, token mean, recompute) and for rloo with a
    constant normaliser (where the finite-G expectation equals the limit exactly), under
    context-keyed Gaussian noise (scale 1; the oracle is then exact). Relative gap
    |mean - oracle| / |oracle| with its Monte-Carlo standard error; base seed 0."""
    import jax
    import jax.numpy as jnp

    from timsim.sampler import Sampler
    from timsim.collect import make_collect
    from timsim.step import learner_batch, make_loss

    timsim.setup()
    rows = []
    for label, extra in (("ppo, zscore, token_mean, recompute", []),
                         ("ppo, rloo, seq_mean_token_sum_norm, bypass",
                          ["grpo.advantage=rloo", "grpo.loss_agg=seq_mean_token_sum_norm",
                           "grpo.old_logprobs=bypass"])):
        for group in (2, 4, 8, 16):
            cfg = timsim.load_config("configs/oracle.yaml", ["perturbation.logit_noise.mode=context",
                                                             f"grpo.group_size={group}",
                                                             f"grpo.prompts_per_step={64 // group}", *extra])
            graphdef, params, _ = get_base(cfg, announce=print)
            hp = hyper.of(cfg)
            oracle = exact.make_oracle(cfg, graphdef, only=("configured",), variance=False)
            expected = np.asarray(oracle(params, params, hp, 0, 0)["updates"][0], np.float64)
            sampler = Sampler.from_config(cfg, graphdef)
            collect, mode = make_collect(cfg, cfg.task.build(), sampler), cfg.grpo.old_logprobs
            loss = make_loss(cfg, graphdef, sampler.spec, recompute_first=mode == "recompute")
            flat, unflatten = jax.flatten_util.ravel_pytree(params)

            def update(step):
                batch = learner_batch(collect(params, hp, step), hp, mode, cfg.correction)
                return -jax.grad(lambda f: loss(unflatten(f), params, batch, hp, True)[0])(flat)

            samples = np.asarray(jax.jit(lambda s: jax.lax.map(update, s, batch_size=50))(jnp.arange(batches)),
                                 np.float64)
            mean, var = samples.mean(0), samples.var(0, ddof=1) / batches
            gap = np.sqrt(((mean - expected) ** 2).sum() / (expected**2).sum())
            noise = np.sqrt(var.sum() / (expected**2).sum())  # the gap's size from Monte-Carlo error alone
            rows.append({"estimator": label, "group_size": group, "relative_gap": gap, "mc_noise": noise,
                         "ratio": ((mean - expected) ** 2).sum() / var.sum()})
            print(rows[-1], flush=True)
    write(pd.DataFrame(rows), out, f"python scripts/oracle_study.py --finite-group {out}")


def claim(out: str) -> None:
    """The paired bypass-vs-recompute comparison on 10 bases (pretrain.seed 0..9), both noise
    modes, scales 0.5 / 1 / 2, fresh noise over 8 draws (those two estimators only, no variance)."""
    timsim.setup()
    frames = []
    for mode in MODES:
        cfg = timsim.load_config("configs/oracle.yaml", [f"perturbation.logit_noise.mode={mode}"])
        graphdef = get_base(cfg, announce=print)[0]
        oracle = exact.make_oracle(cfg, graphdef, only=("recompute", "bypass"), variance=False)
        for base in range(10):
            params = get_base(cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"seed": base})}),
                              announce=print)[1]
            for scale in SCALES[1:]:
                at = timsim.load_config("configs/oracle.yaml", [f"perturbation.logit_noise.mode={mode}",
                                                                 f"perturbation.logit_noise.scale={scale}"])
                table, facts = exact.evaluate(oracle, at, params, params, hyper.of(at), 0, DRAWS)
                frames.append(table.assign(base=base, mode=mode, scale=scale, draws=facts["draws"]))
        print(f"{mode} done", flush=True)
    write(pd.concat(frames), out, f"python scripts/oracle_study.py --claim {out}")


def claim_report(path: str) -> None:
    data = pd.read_parquet(path)
    print("| mode | sigma | rel. bias bypass - recompute | cos to grad E_pi[R] bypass - recompute | "
          "norm / norm(g0), bypass | norm / norm(g0), recompute |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        for s in SCALES[1:]:
            cell = data[(data["mode"] == mode) & (data.scale == s)]
            wide = {c: cell.pivot(index="base", columns="estimator", values=c) for c in ("rel_bias", "cos_true",
                                                                                        "norm_ratio")}
            print(f"| {mode} | {s:g} | {_mean_ci(wide['rel_bias'].bypass - wide['rel_bias'].recompute)} | "
                  f"{_mean_ci(wide['cos_true'].bypass - wide['cos_true'].recompute)} | "
                  f"{_mean_ci(wide['norm_ratio'].bypass)} | {_mean_ci(wide['norm_ratio'].recompute)} |")


def ranking(path: str) -> None:
    """Spearman rank correlation between the oracle's relative bias (context noise, sigma 1, mean
    over bases) and the corrections study's paired final-accuracy loss against the zero twin
    (docs/results/corrections-cpu.md: bypass mode, where a weighting correction replaces r_corr,
    so it is the oracle's recompute+kind)."""
    from scipy.stats import spearmanr

    training = {"none": -0.156, "token_tis": -0.014, "seq_tis": -0.027, "token_mis": -0.049, "seq_mask": -0.186,
                "seq_mis": -0.090, "geometric": -0.629, "kl_rejection": -0.276, "veto": -0.156,
                "offpolicy_mask": -0.158, "cis": -0.023, "prefix_is": -0.061, "minpro": -0.085}
    data = pd.read_parquet(path)
    cell = data[(data["mode"] == "context") & (data.scale == 1.0)].groupby("estimator").rel_bias.mean()
    oracle = {k: cell["bypass" if k == "none" else (f"recompute+{k}" if f"recompute+{k}" in cell and k in
                                                     ("token_tis", "seq_tis", "token_mis", "seq_mis", "cis",
                                                      "prefix_is", "minpro") else f"bypass+{k}")]
              for k in training}
    rho, p = spearmanr([oracle[k] for k in training], [-training[k] for k in training])
    print("| correction | oracle rel. bias (context, sigma 1) | training: final acc - zero (paired, 3 seeds) |")
    print("|---|---|---|")
    for k in sorted(training, key=oracle.get):
        print(f"| {k} | {oracle[k]:.3f} | {training[k]:+.3f} |")
    print(f"\nSpearman rank correlation between oracle bias and training loss: {rho:.2f} (p = {p:.3g}, "
          f"{len(training)} corrections)")


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        report(sys.argv[2])
    elif sys.argv[1] == "--finite-group":
        finite_group_gap(sys.argv[2])
    elif sys.argv[1] == "--claim":
        claim(sys.argv[2])
    elif sys.argv[1] == "--claim-report":
        claim_report(sys.argv[2])
    elif sys.argv[1] == "--ranking":
        ranking(sys.argv[2])
    else:
        run(sys.argv[1])
