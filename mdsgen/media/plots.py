"""Figures for reports and MLflow: mel spectrograms side by side, metric bars. Rendered with
matplotlib's Agg backend into PNG files (DVC's own plots need a CDN to render, which is offline here)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def mel_grid(rows: list[tuple[str, list[tuple[object, str]]]], path) -> Path:
    """One row per clip, one column per version of it: rows = [(clip_id, [(mel [128, T] in [0, 1], title)])]."""
    plt = _pyplot()
    columns = max(len(mels) for _, mels in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(6 * columns, 2.6 * len(rows)), squeeze=False)
    for r, (clip_id, mels) in enumerate(rows):
        for c in range(columns):
            axes[r, c].axis("off")
            if c < len(mels):
                mel, title = mels[c]
                axes[r, c].imshow(mel.numpy() if hasattr(mel, "numpy") else mel, origin="lower", aspect="auto",
                                  vmin=0, vmax=1)
                axes[r, c].set_title(f"{clip_id}: {title}", fontsize=9)
    return _save(plt, fig, path)


def soundtrack_mel(wave, sample_rate: int, path, title: str) -> Path:
    """A whole soundtrack's mel spectrogram (the paper's 128-bin scale) against seconds and hertz."""
    from mdsgen.media.audio import AudioConfig, wave_to_mel

    cfg = AudioConfig(sample_rate=sample_rate)
    mel = wave_to_mel(wave, cfg).numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.imshow(mel, origin="lower", aspect="auto", vmin=0, vmax=1,
              extent=(0, len(wave) / sample_rate, 0, cfg.n_mels))
    ax.set_yticks([0, cfg.n_mels], [f"{cfg.fmin:.0f} Hz", f"{cfg.fmax:.0f} Hz"], fontsize=8)
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def metric_bars(table: dict[str, dict[str, float]], metrics: list[str], path) -> Path:
    """A bar chart per metric, one bar per system: table = {system: {metric: value}}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    systems = list(table)
    for ax, metric in zip(axes[0], metrics):
        values = [table[s].get(metric, float("nan")) for s in systems]
        ax.bar(range(len(systems)), values, color=[f"C{i}" for i in range(len(systems))])
        ax.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    return _save(plt, fig, path)


def generated_vs_real(generated_dir, originals_dir, path, limit: int = 8) -> Path:
    """For each `<stem>.wav` in `generated_dir` whose video `<stem>.*` in `originals_dir` has a soundtrack:
    the real soundtrack's mel beside the generated one's (scaled as the model sees them)."""
    from mdsgen.base.errors import MediaError
    from mdsgen.media.audio import AudioConfig, load_audio, wave_to_mel
    from mdsgen.media.files import VIDEO_SUFFIXES

    cfg = AudioConfig()
    originals = {p.stem: p for p in Path(originals_dir).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES}
    rows = []
    for wav in sorted(Path(generated_dir).glob("*.wav")):
        if wav.stem not in originals or len(rows) == limit:
            continue
        try:
            real = load_audio(originals[wav.stem], cfg.sample_rate)
        except MediaError:  # a silent video: nothing to compare with
            continue
        generated = load_audio(wav, cfg.sample_rate)
        rows.append((wav.stem, [(wave_to_mel(real, cfg), "real"), (wave_to_mel(generated, cfg), "generated")]))
    if not rows:
        raise FileNotFoundError(f"{generated_dir}: no generated WAV whose video in {originals_dir} has sound")
    return mel_grid(rows, path)
