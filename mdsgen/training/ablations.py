"""`mdsgen ablate`: the paper's ablations and ours, every arm trained the same short way with several
seeds, scored by the evaluation suite and tracked in MLflow; `REPORT.md`'s tables are written from the
results.

An arm is the paper's configuration (T, TAM 0.3, Reducer; `BASE_MODEL`) with one thing changed. Trained
arms change the model; sampled arms change only how the paper arm's model of the same seed samples or
decodes (CFG, steps, VAE output channel), so they cost a generation, not a training run. Each arm and
seed is one MLflow run (experiment `ablations.experiment`, tags `ablation.*`) and one JSON file under
`ablations.out`; an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

BASE_ARM = "paper"


@dataclass(frozen=True)
class AblationConfig:
    """params.yaml `ablations`: the short schedule every trained arm shares, and where results go."""
    steps: int = 100
    batch_size: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    clips: int | None = None       # the first N test clips; None: all
    experiment: str = "mdsgen-ablations"
    out: str = "reports/ablations"
    state_dir: str = "runs/ablations"

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(self.seeds))


BASE_MODEL = {"mask_strategy": "tam", "mask_ratio": 0.3, "frame_tokens": False, "conditioning": "reducer"}
TRAINED_ARMS = {  # in the order a sweep runs them
    BASE_ARM: {},
    "frame_tokens": {"frame_tokens": True},
    "sam": {"mask_strategy": "sam"},
    "no_mask": {"mask_strategy": "none"},
    "cross_attention": {"conditioning": "cross_attention"},
    "mask_0.5": {"mask_ratio": 0.5},
    "mask_0.7": {"mask_ratio": 0.7},
}
SAMPLED_ARMS = {  # sampling overrides, and the VAE output channel (None: the checkpoint's)
    "cfg_1": ({"cfg_scale": 1.0}, None),
    "cfg_3": ({"cfg_scale": 3.0}, None),
    "cfg_7": ({"cfg_scale": 7.0}, None),
    "cfg_power_1": ({"cfg_power": 1.0}, None),
    "steps_10": ({"steps": 10}, None),
    "steps_50": ({"steps": 50}, None),
    "channel_R": ({}, 0),
    "channel_B": ({}, 2),
    "channel_mean": ({}, "mean"),
}
ARMS = (*TRAINED_ARMS, *SAMPLED_ARMS)
# (metric, True when higher is better): what the tables show and the orderings are judged on
METRICS = (("frechet_distance", False), ("kl", False), ("class_agreement", True), ("onset_auc", True),
           ("onset_f1", True), ("onset_median_error_ms", False), ("align_aligned_share", True))


@dataclass(frozen=True)
class Group:
    name: str
    title: str
    arms: tuple[str, ...]
    labels: tuple[str, ...]
    claim: str                               # what the paper (or we) claim
    ordering: tuple[str, ...] = ()           # the claimed ranking, best first


GROUPS = (
    Group("masking", "Masking strategy", (BASE_ARM, "sam", "no_mask"), ("TAM", "SAM", "none"),
          "paper Tab. 6: TAM beats SAM beats no mask", (BASE_ARM, "sam", "no_mask")),
    Group("mask_ratio", "TAM mask ratio", (BASE_ARM, "mask_0.5", "mask_0.7"), ("0.3", "0.5", "0.7"),
          "paper: 0.3 is the ratio it uses for TAM", (BASE_ARM, "mask_0.5", "mask_0.7")),
    Group("conditioning", "Reducer vs all 32 frame features", (BASE_ARM, "cross_attention"),
          ("Reducer (paper)", "cross-attention to all frames"),
          "paper Tab. 3: the Reducer beats feeding all frame features", (BASE_ARM, "cross_attention")),
    Group("frame_tokens", "Beyond the paper: time-aligned frame tokens", (BASE_ARM, "frame_tokens"),
          ("Reducer (paper)", "Reducer + frame tokens"),
          "ours: a per-column frame feature improves onset sync", ("frame_tokens", BASE_ARM)),
    Group("cfg", "CFG scale and power", ("cfg_1", "cfg_3", BASE_ARM, "cfg_7", "cfg_power_1"),
          ("scale 1 (none)", "scale 3", "scale 5, p 0.01 (paper)", "scale 7", "scale 5, p 1"),
          "paper Sec. 3.4: scale 5-6 with power 0.01 is best", (BASE_ARM, "cfg_3", "cfg_1")),
    Group("steps", "DPM-Solver++ steps", ("steps_10", BASE_ARM, "steps_50"), ("10", "25 (paper)", "50"),
          "paper: 25 steps", ()),
    Group("channel", "VAE output channel", ("channel_R", BASE_ARM, "channel_B", "channel_mean"),
          ("R (0)", "G (1, paper)", "B (2)", "mean"), "paper Tab. 5: G beats R", (BASE_ARM, "channel_R")),
)


def check_arms(arms) -> list[str]:
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown ablation arms {unknown}; known: {', '.join(ARMS)}")
    return list(arms)


def arm_params(params, arm: str, seed: int, settings: AblationConfig):
    """The full Params of one trained arm and seed: the paper's model with the arm's change, the short
    schedule of `ablations`, the seed for initialisation, data order and noise."""
    train = replace(params.train, steps=settings.steps, batch_size=settings.batch_size, seed=seed,
                    checkpoint_every=settings.steps, log_every=min(10, settings.steps), sample_every=0, sample_clips=2)
    return replace(params, model=params.model.with_values(**{**BASE_MODEL, **TRAINED_ARMS[arm]}), train=train,
                   mlflow=replace(params.mlflow, experiment=settings.experiment))


def check_schedule(where, found: dict, settings: AblationConfig) -> None:
    """Saved models and results are reused only under the schedule that made them."""
    for key in ("steps", "batch_size"):
        if key in found and found[key] != getattr(settings, key):
            raise ValueError(f"{where} was made with ablations.{key} = {found[key]}, not {getattr(settings, key)}: point "
                             "ablations.out and ablations.state_dir at new folders for another schedule")


def result_path(out_dir, arm: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / f"{arm}-seed{seed}.json"


def read_results(out_dir) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((Path(out_dir) / "runs").glob("*.json"))]


class Sweep:
    """Runs arms x seeds; what every run shares (the test set, the evaluation networks) is loaded once."""

    def __init__(self, params, settings: AblationConfig, latents_dir, vae_dir, dataset_dir, align_dir, device: str = "cpu"):
        from mdsgen.evaluation.evaluate import TestSet

        self.params, self.settings, self.device = params, settings, device
        self.latents_dir, self.vae_dir = Path(latents_dir), Path(vae_dir)
        self.out, self.state = Path(settings.out), Path(settings.state_dir)
        self.tests = TestSet(dataset_dir, latents_dir, align_dir, params.audio, settings.clips, device)
        self.batch_size = params.evaluate.batch_size
        self.base_latents: dict[int, tuple] = {}  # seed -> the paper arm's latents and cost, for decode-only arms

    # --- one arm ---------------------------------------------------------------------------------
    def checkpoint(self, arm: str, seed: int):
        """The trained arm's checkpoint: trained now unless an earlier sweep left it."""
        from mdsgen.model.checkpoint import load_checkpoint
        from mdsgen.training.train import train

        folder = self.state / f"{arm}-seed{seed}"
        if not (folder / "checkpoint" / "config.json").is_file():
            p = arm_params(self.params, arm, seed, self.settings)
            print(f"[{arm} seed {seed}] training {p.train.steps} steps at batch {p.train.batch_size}")
            metrics = train(p, self.latents_dir, self.vae_dir, folder / "checkpoint", folder / "state", self.device)
            shutil.rmtree(folder / "state", ignore_errors=True)  # the optimizer state is not needed again
            (folder / "train.json").write_text(json.dumps({**metrics, "batch_size": p.train.batch_size}, indent=1))
        metrics = json.loads((folder / "train.json").read_text())
        check_schedule(folder, metrics, self.settings)
        return load_checkpoint(str(folder / "checkpoint"), self.device), metrics

    def run(self, arm: str, seed: int) -> dict:
        """Train (trained arms) or reuse the paper arm's model (sampled arms), score it, record it."""
        import mlflow

        from mdsgen.evaluation import tracking
        from mdsgen.evaluation.evaluate import generate_model_waves
        from mdsgen.inference.generate import FeaturesToAudio

        path = result_path(self.out, arm, seed)
        if path.is_file():
            saved = json.loads(path.read_text())
            check_schedule(path, saved["train"], self.settings)
            if saved["clips"] != self.tests.n:
                raise ValueError(f"{path} scored {saved['clips']} test clips, not {self.tests.n}: point "
                                 "ablations.out at a new folder for another test set")
            return saved
        trained = arm in TRAINED_ARMS
        ckpt, train_metrics = self.checkpoint(arm if trained else BASE_ARM, seed)
        overrides, channel = ({}, None) if trained else SAMPLED_ARMS[arm]
        sampling = replace(self.params.sampling, **overrides)
        if channel is not None:
            ckpt.vae.decode_channel = channel
        start = time.perf_counter()
        if channel is not None and not overrides and seed in self.base_latents:  # same latents, other channel
            latents, efficiency = self.base_latents[seed]
            waves = FeaturesToAudio(ckpt, self.device, self.batch_size).waves(latents).numpy()
        else:
            latents, waves, efficiency = generate_model_waves(ckpt, self.tests, sampling, seed, self.device,
                                                              self.batch_size)
        if arm == BASE_ARM:
            self.base_latents[seed] = (latents, efficiency)
        scores = {**self.tests.score(waves), **efficiency}
        tags = {"ablation.arm": arm, "ablation.seed": str(seed), "ablation.kind": "trained" if trained else "sampled",
                "ablation.model_run": train_metrics["mlflow_run_id"]}
        tracking.use_tracking(self.params.mlflow.tracking_uri, self.settings.experiment)
        run_id = train_metrics["mlflow_run_id"] if trained else None
        with mlflow.start_run(run_id=run_id) as run:
            mlflow.set_tags({**tags, "mlflow.runName": f"{arm}-seed{seed}"})
            if not trained:
                mlflow.log_params({"sampling." + k: v for k, v in overrides.items()} |
                                  {"vae.decode_channel": ckpt.vae.decode_channel})
            mlflow.log_metrics({f"test_{k}": float(v) for k, v in scores.items()
                                if isinstance(v, (int, float)) and np.isfinite(v)})
            run_id = run.info.run_id
        result = {"arm": arm, "seed": seed, "mlflow_run_id": run_id, "model_run_id": train_metrics["mlflow_run_id"],
                  "model": ckpt.model.config.to_dict(), "sampling": asdict(sampling), "decode_channel": ckpt.vae.decode_channel,
                  "train": {"steps": self.settings.steps, "batch_size": self.settings.batch_size} | {
                      "seconds": train_metrics.get("seconds_this_invocation"), "final_loss": train_metrics.get("final_loss")},
                  "clips": self.tests.n, "scores": scores, "score_seconds": time.perf_counter() - start}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"[{arm} seed {seed}] " + ", ".join(f"{m} {scores[m]:.3f}" for m, _ in METRICS if m in scores))
        return result

    def references(self) -> dict:
        """The systems every arm is read against, once: ground truth through the VAE, retrieval, real audio."""
        from mdsgen.data.features import load_latents
        from mdsgen.evaluation.evaluate import nearest_training_clips
        from mdsgen.inference.generate import FeaturesToAudio
        from mdsgen.model.checkpoint import init_checkpoint

        path = self.out / "references.json"
        if path.is_file():
            return json.loads(path.read_text())
        p = replace(self.params, vae=replace(self.params.vae, path=str(self.vae_dir)))
        core = FeaturesToAudio(init_checkpoint(p), self.device, self.batch_size)
        train = load_latents(self.latents_dir, "train")
        nearest = nearest_training_clips(self.tests.features, train["features"])
        refs = {"ground_truth_vae": self.tests.score(core.waves(self.tests.latents).numpy()),
                "retrieval": self.tests.score(core.waves(train["latents"][nearest]).numpy()),
                "real_audio": self.tests.score(self.tests.real, real=True)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(refs, indent=1) + "\n")
        return refs


def run_sweep(params, settings: AblationConfig, arms, seeds, latents_dir, vae_dir, dataset_dir, align_dir,
              device: str = "cpu") -> list[dict]:
    """Every arm for seed 0, then for seed 1, ...: an interrupted sweep has whole seeds to report."""
    arms = check_arms(arms)  # before anything is loaded
    sweep = Sweep(params, settings, latents_dir, vae_dir, dataset_dir, align_dir, device)
    sweep.references()
    return [sweep.run(arm, seed) for seed in seeds for arm in arms]


# --- the report --------------------------------------------------------------------------------------
def summarize(results: list[dict]) -> dict:
    """arm -> metric -> (mean, standard deviation over seeds, seeds), plus the arm's MLflow runs."""
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, runs in by_arm.items():
        stats = {}
        for metric, _ in METRICS:
            values = np.array([r["scores"][metric] for r in runs if metric in r["scores"]], dtype=float)
            if len(values):
                stats[metric] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                 len(values))
        stats["runs"] = sorted((r["seed"], r["mlflow_run_id"]) for r in runs)
        stats["params_inference"] = runs[0]["scores"].get("params_inference")
        out[arm] = stats
    return out


def ordering_verdict(summary: dict, ordering: tuple[str, ...], metric: str, higher: bool) -> str:
    """'holds' when the means follow the claimed ranking, 'holds (within spread)' when they do but a gap is
    smaller than the larger standard deviation of its pair, 'tie' when two means are equal, 'fails' otherwise."""
    verdict = "holds"
    for better, worse in zip(ordering, ordering[1:]):
        (m1, s1, _), (m2, s2, _) = summary[better][metric], summary[worse][metric]
        gap = (m1 - m2) if higher else (m2 - m1)
        if gap < 0:
            return "fails"
        if gap == 0:
            verdict = "tie"
            continue
        if gap < max(s1, s2):
            verdict = "holds (within spread)"
    return verdict


def format_tables(results: list[dict], references: dict | None = None) -> str:
    summary = summarize(results)
    lines = []
    if results:
        first = results[0]
        lines += [f"Every trained arm: {first['train']['steps']} steps at batch {first['train']['batch_size']}, "
                  f"seeds {sorted({r['seed'] for r in results})}; scored on {first['clips']} test clips. "
                  "Cells: mean ± standard deviation over seeds (n = seeds). Lower is better for FD, KL and onset "
                  "error.", ""]
    header = "| arm | n | params | " + " | ".join(m for m, _ in METRICS) + " |"
    rule = "|---" * (len(METRICS) + 3) + "|"
    for group in GROUPS:
        present = [(a, label) for a, label in zip(group.arms, group.labels) if a in summary]
        if not present:
            continue
        lines += [f"### {group.title}", "", f"Claim: {group.claim}.", "", header, rule]
        for arm, label in present:
            s = summary[arm]
            cells = [f"{s[m][0]:.3f} ± {s[m][1]:.3f}" if m in s else "-" for m, _ in METRICS]
            params = f"{s['params_inference'] / 1e6:.2f}M" if s.get("params_inference") else "-"
            n = max((s[m][2] for m, _ in METRICS if m in s), default=0)
            lines.append(f"| {label} | {n} | {params} | " + " | ".join(cells) + " |")
        if group.ordering and all(a in summary for a in group.ordering):
            verdicts = [f"{m}: {ordering_verdict(summary, group.ordering, m, higher)}" for m, higher in METRICS
                        if all(m in summary[a] for a in group.ordering)]
            names = " > ".join(dict(zip(group.arms, group.labels))[a] for a in group.ordering)
            lines += ["", f"Ordering {names}: " + "; ".join(verdicts) + "."]
        lines.append("")
    if references:
        lines += ["### References (no training)", "", "| system | " + " | ".join(m for m, _ in METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]
        for name, scores in references.items():
            lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.3f}" if m in scores else "-"
                                                    for m, _ in METRICS) + " |")
        lines.append("")
    lines += ["### MLflow runs", "", "| arm | seed: run id |", "|---|---|"]
    for arm in ARMS:
        if arm in summary:
            lines.append(f"| {arm} | " + ", ".join(f"{seed}: `{run}`" for seed, run in summary[arm]["runs"]) + " |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- ablation tables: begin (mdsgen ablate --report) -->", "<!-- ablation tables: end -->"


def write_report(out_dir, report="REPORT.md") -> str:
    """Replace the generated block of REPORT.md (between the markers) with tables from the results; the
    prose around it is kept. A report without the markers gets the block appended."""
    out_dir = Path(out_dir)
    refs_path = out_dir / "references.json"
    refs = json.loads(refs_path.read_text()) if refs_path.is_file() else None
    block = f"{BEGIN}\n{format_tables(read_results(out_dir), refs)}{END}"
    path = Path(report)
    text = path.read_text() if path.is_file() else "# Ablations\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return block
