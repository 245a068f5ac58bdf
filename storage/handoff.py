"""Fine-tuning on another machine: inputs and outputs travel as MLflow artifacts.

Workers share no volume, only the tracking server (which proxies the artifact store). The
caller logs the model folder, the corpus and, for a spec given as a file, the spec as
artifacts of an MLflow run; the remote flow downloads them, fine-tunes and logs the result
under the same run::

    runs:/<run_id>/input-model/   the model folder to train (model + tokenizer)
    runs:/<run_id>/corpus/        corpus.parquet, manifest.json, rejected.parquet
    runs:/<run_id>/spec/<f>.yaml  only for a spec that is a file (shipped names travel as names)
    runs:/<run_id>/model/         the fine-tuned folder (the remote flow's output)

On the remote worker, one folder per run under ``handoff/`` in the state folder::

    <run_id>/input-model/ corpus/ spec/<f>.yaml   the downloaded inputs
    <run_id>/finetune/                            the fine-tuning run (its checkpoints)

The caller tags the run with a key of its inputs (``tasc.handoff_key``), so a re-run finds it
again: a finished one is reused, an unfinished one is handed out again (reopened, see
storage.tracking) and the remote worker resumes from its checkpoints if its folder still
exists. Downloads land in a temporary folder that is renamed into place, so a destination
that exists is complete and is never fetched twice.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow

from storage.settings import handoff_dir, mlflow_tracking_uri
from storage.tracking import client

INPUT_MODEL, CORPUS, SPEC, OUTPUT_MODEL = "input-model", "corpus", "spec", "model"
KEY_TAG = "tasc.handoff_key"


def run_uri(run_id: str, artifact_path: str) -> str:
    return f"runs:/{run_id}/{artifact_path}"


def is_uri(value: str) -> bool:
    """An artifact URI (``runs:/``, ``models:/``, ``s3://``, ``file://``...) rather than a name or path."""
    return value.startswith(("runs:/", "models:/")) or "://" in value


def run_folder(run_id: str) -> Path:
    """The remote side's folder of one hand-off run: downloads and the fine-tuning run."""
    return handoff_dir() / run_id


def has_artifact(run_id: str, artifact_path: str) -> bool:
    return bool(client().list_artifacts(run_id, artifact_path))


def _artifact_sizes(run_id: str, path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in client().list_artifacts(run_id, path):
        out.update(_artifact_sizes(run_id, f.path) if f.is_dir else {f.path: f.file_size})
    return out


def uploaded(run_id: str, local: str | Path, artifact_path: str) -> bool:
    """The folder ``local`` is already under ``artifact_path`` of the run: same file names and
    sizes (a run handed out again need not upload a model twice)."""
    p = Path(local)
    want = {f"{artifact_path}/{f.relative_to(p).as_posix()}": f.stat().st_size for f in p.rglob("*") if f.is_file()}
    return bool(want) and _artifact_sizes(run_id, artifact_path) == want


def upload(run_id: str, local: str | Path, artifact_path: str) -> str:
    """Log a file or a folder's files under ``artifact_path`` of the run; returns its URI
    (``runs:/<run_id>/<artifact_path>``, or ``.../<file name>`` for a file)."""
    p, c = Path(local), client()
    if p.is_dir():
        c.log_artifacts(run_id, str(p), artifact_path=artifact_path)
        return run_uri(run_id, artifact_path)
    if not p.is_file():
        raise FileNotFoundError(f"nothing to upload at {p}")
    c.log_artifact(run_id, str(p), artifact_path=artifact_path)
    return run_uri(run_id, f"{artifact_path}/{p.name}")


def download(uri: str, dest: str | Path) -> Path:
    """The artifact (file or folder) at ``uri`` as ``dest``; an existing ``dest`` is taken as
    it is (downloads are renamed into place only once complete)."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    client()  # sets the tracking URI and the state folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                       tracking_uri=mlflow_tracking_uri()))
        if not got.exists() or (got.is_dir() and not any(got.iterdir())):
            raise FileNotFoundError(f"no artifact at {uri}")
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def publish_inputs(run_id: str, spec: str, model_dir: str | Path, corpus_path: str | Path) -> dict:
    """Log the model folder and the corpus folder (and a spec that is a file) to the run,
    skipping what it already holds; returns the remote flow's parameters that name them
    (``spec``, ``model_uri``, ``corpus_uri``)."""
    for local, name in ((model_dir, INPUT_MODEL), (corpus_path, CORPUS)):
        if not uploaded(run_id, local, name):
            upload(run_id, local, name)
    return {"spec": upload(run_id, spec, SPEC) if Path(spec).is_file() else spec,
            "model_uri": run_uri(run_id, INPUT_MODEL), "corpus_uri": run_uri(run_id, CORPUS)}


def fetch_inputs(spec: str, model_uri: str, corpus_uri: str, run_id: str) -> dict:
    """Download what the caller published into this worker's folder of the run: the local
    ``spec``, ``model`` and ``corpus``, and ``out_dir`` for the fine-tuning run (kept there,
    so a run handed out again resumes)."""
    folder = run_folder(run_id)
    if is_uri(spec):
        spec = str(download(spec, folder / SPEC / spec.rsplit("/", 1)[-1]))
    return {"spec": spec, "model": str(download(model_uri, folder / INPUT_MODEL)),
            "corpus": str(download(corpus_uri, folder / CORPUS)), "out_dir": str(folder / "finetune")}


def fetch_output(run_id: str, dest: str | Path) -> Path:
    """The run's fine-tuned model folder, downloaded as ``dest``."""
    return download(run_uri(run_id, OUTPUT_MODEL), dest)


def find_run(experiment: str, key: str) -> dict | None:
    """The newest run of ``experiment`` tagged with hand-off ``key``: run_id, status and
    whether its output model is there; None without one."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    info = runs[0].info
    return {"run_id": info.run_id, "status": info.status, "has_model": has_artifact(info.run_id, OUTPUT_MODEL)}


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of each metric the run logged."""
    return dict(client().get_run(run_id).data.metrics)
