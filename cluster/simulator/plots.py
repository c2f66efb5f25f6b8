"""PNG figures of a simulation run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.simulator.report import LAT_BIN_MS, Accounting


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(acc: Accounting, out: Path, label: str, faults: list[tuple[str, float]],
                replicas_t: np.ndarray | None = None, replicas_n: np.ndarray | None = None) -> dict[str, str]:
    """Writes latency_cdf.png, outcomes.png, replicas.png, bandwidth.png; returns their paths."""
    import textwrap

    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    label = "\n".join(textwrap.wrap(label, 95))
    cols = acc.tick_arrays()
    t = cols["t"].astype(float) if len(acc.ticks) else np.zeros(0)
    paths: dict[str, str] = {}

    def finish(fig, name: str, ax) -> None:
        for kind, at in faults:
            ax.axvline(at, color="red", ls="--", lw=1)
            ax.text(at, ax.get_ylim()[1], f" {kind}", color="red", va="top", fontsize=8)
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths[name.removesuffix(".png")] = str(p)

    # Latency CDF (frames answered ai).
    fig, ax = plt.subplots(figsize=(7, 4))
    for hist, name in ((acc.latency_hist, "bridge send -> outcome"), (acc.replica_latency_hist, "replica queue + compute")):
        if hist.sum():
            x = (np.arange(hist.size) + 0.5) * LAT_BIN_MS
            cdf = np.cumsum(hist) / hist.sum()
            top = int(np.searchsorted(cdf, 0.9999)) + 1
            ax.plot(x[:top], cdf[:top], label=name)
    ax.set_xlabel("latency (simulated ms)")
    ax.set_ylabel("fraction of AI frames")
    ax.set_title(f"Latency CDF\n{label}", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no frame was answered with AI codes", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)
    paths["latency_cdf"] = str(out / "latency_cdf.png")

    # Outcomes over time, per simulated second, stacked by reason.
    secs = sorted(acc.per_second_reasons)
    fig, ax = plt.subplots(figsize=(7, 4))
    if secs:
        keys = sorted({k for s in secs for k in acc.per_second_reasons[s]}, key=lambda k: (k != "ai", k))
        x = np.asarray(secs, float)
        totals = np.asarray([sum(acc.per_second_reasons[s].values()) for s in secs], float)
        bottom = np.zeros(len(secs))
        for k in keys:
            frac = np.asarray([acc.per_second_reasons[s].get(k, 0) for s in secs], float) / np.maximum(totals, 1)
            if k == "ai":
                continue
            ax.bar(x, frac * 100, bottom=bottom, width=0.9, label=f"fallback/{k}", align="edge")
            bottom += frac * 100
        if not bottom.any():  # no fallback at all: say so over the whole run
            ax.step(x, bottom, where="post", color="C2", label="no fallback")
        ax.set_xlim(float(x.min()), float(x.max()) + 1.0)
        ax.set_ylim(0, max(2.0, float(bottom.max()) * 1.2))
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("frames that fell back (%)")
    ax.set_title(f"Fallback by reason over time\n{label}", fontsize=8)
    ax.grid(alpha=0.3)
    if secs:
        ax.legend(fontsize=8, loc="upper right")
    finish(fig, "outcomes.png", ax)

    # Replicas and live streams over time.
    fig, ax = plt.subplots(figsize=(7, 4))
    if t.size:
        ax.step(t, cols["replicas"], where="post", label="codec replicas", color="C0")
        ax.set_ylim(0, max(1, int(cols["replicas"].max())) + 1)
        ax2 = ax.twinx()
        ax2.plot(t, cols["live"], color="C1", label="live streams")
        ax2.set_ylabel("live streams", color="C1")
        ax2.set_ylim(0, max(1, int(cols["live"].max())) * 1.1)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("codec replicas", color="C0")
    ax.set_title(f"Replicas and streams\n{label}", fontsize=8)
    ax.grid(alpha=0.3)
    finish(fig, "replicas.png", ax)

    # Egress bandwidth: what was sent (AI where it worked) vs everything in the native codec.
    fig, ax = plt.subplots(figsize=(7, 4))
    if t.size:
        w = max(1, int(round(1.0 / max(1e-9, np.median(np.diff(t)) if t.size > 1 else 1.0))))
        kern = np.ones(w) / w
        dt = np.median(np.diff(t)) if t.size > 1 else 0.04
        sent = (cols["ai_bytes"] + cols["native_bytes"]) * 8 / dt / 1e6
        native_all = cols["native_all_bytes"] * 8 / dt / 1e6 if "native_all_bytes" in cols else None
        norm = np.convolve(np.ones_like(sent), kern, "same")  # true mean at the edges too
        ax.plot(t, np.convolve(sent, kern, "same") / norm, label="sent (AI frames + native fallback)")
        if native_all is not None:
            ax.plot(t, np.convolve(native_all, kern, "same") / norm, label="all native (Opus)")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("egress per copy (Mbit/s)")
    ax.set_title(f"Bandwidth AI vs native\n{label}", fontsize=8)
    ax.grid(alpha=0.3)
    if t.size:
        ax.legend(fontsize=8)
    finish(fig, "bandwidth.png", ax)
    return paths
