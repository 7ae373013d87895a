"""`upcycle push`: publish a converted (or trained) model folder to the Hugging Face Hub.

Everything Hub-side goes through huggingface_hub's HfApi: `create_repo(exist_ok=True)`, `create_branch`
and `upload_folder`, which (with hf_xet, the default) streams large folders in several commits and resumes
an interrupted upload when run again. The token comes from where huggingface_hub looks for it (HF_TOKEN, the
saved login) and is never printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UpcycleError
from ..source import read_header, weight_files
from .card import CARD, update_recipe

# Never uploaded: optimizer and scheduler states, RNG states, temporary and hidden files.
NEVER = ("optimizer", "scheduler", "rng_state", "trainer_state")


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    folder: Path
    files: list[tuple[str, int]]  # (path in repo, bytes)
    private: bool
    revision: str | None
    dry_run: bool
    url: str | None = None
    pr_url: str | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "folder": str(self.folder),
            "private": self.private,
            "revision": self.revision,
            "dry_run": self.dry_run,
            "url": self.url,
            "pr_url": self.pr_url,
            "files": [{"path": p, "bytes": n} for p, n in self.files],
            "total_bytes": self.total_bytes,
            "skipped": self.skipped,
        }


def model_root(folder: Path) -> Path:
    """The folder holding the model: DIR itself, or DIR/final for a training run directory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UpcycleError(f"{folder} is not a folder; give the folder that `upcycle convert` or `train` wrote")
    if (folder / "config.json").is_file():
        return folder
    if (folder / "final" / "config.json").is_file():
        return folder / "final"
    raise UpcycleError(f"{folder} has no config.json (nor final/config.json); it is not a complete model folder")


def check_complete(root: Path) -> None:
    """A model folder is complete when its config parses, every shard is there and readable, and its card parses."""
    try:
        json.loads((root / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UpcycleError(f"{root}/config.json is not valid JSON; the model folder is damaged") from None
    for shard in weight_files(root):
        read_header(shard)  # raises a one-line error for a truncated or corrupt shard
    card = root / CARD
    if not card.is_file():
        raise UpcycleError(f"{root} has no model card (README.md); write one before publishing")
    from huggingface_hub import ModelCard

    try:
        ModelCard.load(card, ignore_metadata_errors=False)
    except Exception as exc:  # huggingface_hub raises ValueError and yaml errors for bad metadata
        raise UpcycleError(f"the metadata of {card} does not parse: {str(exc).splitlines()[0]}") from None


def files_to_push(folder: Path, root: Path, include_checkpoints: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """(files to upload as (path in repo, size), files left out). Paths are relative to the model root, except
    checkpoints, which keep their place under checkpoints/."""
    chosen, skipped = [], []
    candidates = [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*")) if p.is_file()]
    if include_checkpoints and root != folder and (folder / "checkpoints").is_dir():
        candidates += [
            (p, p.relative_to(folder).as_posix()) for p in sorted((folder / "checkpoints").rglob("*")) if p.is_file()
        ]
    for path, rel in candidates:
        parts = rel.split("/")
        hidden = any(part.startswith(".") for part in parts)
        state = any(path.name.startswith(prefix) for prefix in NEVER)
        nested_checkpoint = root == folder and parts[0] == "checkpoints" and not include_checkpoints
        if hidden or state or nested_checkpoint:
            skipped.append(rel)
        else:
            chosen.append((rel, path.stat().st_size))
    return chosen, skipped


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UpcycleError(
            "no Hugging Face token found; log in with `hf auth login` or set HF_TOKEN (a token with write access)"
        )
    return token


def require_token() -> None:
    """Fail early (before a long conversion) when a push could not authenticate."""
    _token()


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    include_checkpoints: bool = False,
    dry_run: bool = False,
) -> PushResult:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UpcycleError(f"{repo_id!r} is not a Hub repo id; use the form user/name or org/name") from None
    folder = Path(folder)
    root = model_root(folder)
    check_complete(root)
    token = None if dry_run else _token()
    if not dry_run:  # record the repo; a generated card's loading snippet then names it
        update_recipe(root, hub_repo=repo_id)
    files, skipped = files_to_push(folder, root, include_checkpoints)
    result = PushResult(repo_id, root, files, private, revision, dry_run, skipped=skipped)
    if dry_run:
        return result
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    message = commit_message or f"Upload {root.name} with upcycle"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=root,
            repo_type="model",
            revision=revision,
            commit_message=message,
            create_pr=create_pr,
            allow_patterns=[rel for rel, _ in files if not rel.startswith("checkpoints/") or root == folder],
        )
        if include_checkpoints and root != folder and (folder / "checkpoints").is_dir():
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder / "checkpoints",
                path_in_repo="checkpoints",
                repo_type="model",
                revision=revision,
                commit_message=f"{message} (checkpoints)",
                create_pr=create_pr,
                allow_patterns=[rel.removeprefix("checkpoints/") for rel, _ in files if rel.startswith("checkpoints/")],
            )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise UpcycleError(
                f"the Hub refused the upload to {repo_id} ({status}); check that your token has write access "
                "(`hf auth login`)"
            ) from None
        raise UpcycleError(f"the upload to {repo_id} failed: {str(exc).splitlines()[0]}") from None
    url = getattr(info, "commit_url", None) or str(repo_url)
    return replace(result, url=url, pr_url=getattr(info, "pr_url", None))
