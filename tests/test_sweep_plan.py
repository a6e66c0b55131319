"""Sweep planning, SLURM job scripts and run states: everything about sweeps that trains nothing."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe, write_recipe
from fusionlab.cli import main as fusionlab_main
from fusionlab.models import EarlyFusion, LateFusion
from fusionlab.scaling import launch, sweep
from fusionlab.scaling.sweep import SpecError
from fusionlab.training.schedule import wsd_factor

REPO = Path(__file__).parents[1]
STUDY_SPECS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))

LATE_BACKBONE = {
    "class_path": "fusionlab.models.LateFusion",
    "init_args": {
        "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_multiple_of": 32, "encoder": "vit_base_patch16_224",
        "encoder_width": 16, "encoder_layers": 2, "encoder_heads": 2,
    },
}


@pytest.fixture
def base_recipes(tmp_path) -> dict[str, Path]:
    """Tiny early and late fusion recipes; planning never reads their shards."""
    early = tiny_recipe(tmp_path / "shards", tmp_path / "unused")
    late = tiny_recipe(tmp_path / "shards", tmp_path / "unused", model={"backbone": LATE_BACKBONE})
    return {"early": write_recipe(tmp_path / "early.yaml", early), "late": write_recipe(tmp_path / "late.yaml", late)}


def write_spec(path: Path, **changes) -> Path:
    spec = {
        "study": "tiny",
        "architectures": {
            "early": {
                "recipe": "early.yaml",
                "widths": {32: {"lr": 3e-3}, 64: {"lr": 2e-3, "set": {"model.backbone.init_args.n_heads": 4}}},
            },
            "late": {
                "recipe": "late.yaml",
                "width_keys": {"model.backbone.init_args.d_model": 1, "model.backbone.init_args.encoder_width": 0.5},
                "widths": {32: {"lr": 3e-3}, 64: {"lr": 2e-3}},
            },
        },
        # 4 rows x 128 positions per step: 512 tokens per step
        "budgets": {"tokens": [12_800, 25_600, 51_200]},
        "schedule": {"warmup": [{"below_steps": 40, "warmup_steps": 5}, {"warmup_steps": 10}]},
    }
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def plan(tmp_path: Path, **changes) -> sweep.Plan:
    spec = sweep.load_spec(write_spec(tmp_path / "spec.yaml", **changes))
    return sweep.plan_study(spec, tmp_path / "sweep", workdir=tmp_path)


# ------------------------------------------------------------------------------------ planning


def test_paper_warmup_rule():
    rules = sweep.PAPER_WARMUP
    assert sweep.warmup_steps_for(1200, rules) == 1000
    assert sweep.warmup_steps_for(4999, rules) == 1000
    assert sweep.warmup_steps_for(5000, rules) == 2500
    assert sweep.warmup_steps_for(14999, rules) == 2500
    assert sweep.warmup_steps_for(15000, rules) == 5000
    assert sweep.warmup_steps_for(300_000, rules) == 5000


def test_plan_resolves_one_recipe_per_run(tmp_path, base_recipes):
    result = plan(tmp_path)
    assert len(result.runs) == 2 * 2 * 3
    assert {run.kind for run in result.runs} == {"run"}
    assert result.by_id()["early_w32_t25.6k"].steps == 50

    for run in result.runs:
        recipe = result.recipes[run.id]
        assert recipe["trainer"]["max_steps"] == run.steps == run.tokens // 512
        assert recipe["model"]["lr"] == run.lr == (3e-3 if run.width == 32 else 2e-3)
        assert recipe["model"]["warmup_steps"] == run.warmup_steps == (5 if run.steps < 40 else 10)
        assert recipe["model"]["cooldown_fraction"] == 0.2
        assert recipe["model"]["backbone"]["init_args"]["d_model"] == run.width
        # validation once, at the last step; the log folder fixed for resuming and collecting
        assert recipe["trainer"]["val_check_interval"] == run.steps
        logger = recipe["trainer"]["logger"]["init_args"]
        assert Path(logger["save_dir"], logger["name"], logger["version"]) == tmp_path / "sweep" / run.log_dir
        assert run.log_dir == f"runs/{run.architecture}/{run.id}"
        assert recipe["checkpoint"]["save_last"] is True
        markers = recipe["trainer"]["callbacks"][-1]
        assert markers["class_path"] == "fusionlab.training.markers.RunMarkers"
        assert markers["init_args"]["directory"] == str(tmp_path / "sweep" / run.log_dir / "markers")

    late = result.recipes["late_w64_t12.8k"]["model"]["backbone"]["init_args"]
    assert late["encoder_width"] == 32
    assert result.recipes["early_w64_t12.8k"]["model"]["backbone"]["init_args"]["n_heads"] == 4


def test_plan_counts_parameters_like_the_model(tmp_path, base_recipes):
    runs = plan(tmp_path).by_id()
    early = EarlyFusion(vocab_size=264, image_size=16, patch_size=4, d_model=64, n_layers=2, n_heads=4,
                        ffn_multiple_of=32).parameter_counts()
    assert (runs["early_w64_t12.8k"].N, runs["early_w64_t12.8k"].N_v) == (early.N, early.N_v)
    late_args = dict(LATE_BACKBONE["init_args"], d_model=64, encoder_width=32)
    late = LateFusion(vocab_size=264, image_size=16, patch_size=4, **late_args).parameter_counts()
    assert (runs["late_w64_t12.8k"].N, runs["late_w64_t12.8k"].N_v) == (late.N, late.N_v)
    assert late.N_v > 0
    run = runs["late_w64_t51.2k"]
    assert run.flops == pytest.approx(6 * (late.N + late.N_v) * 51_200)


def test_planned_recipes_parse_with_the_cli(tmp_path, base_recipes, capsys):
    from fusionlab.training.cli import run_lightning_cli

    result = plan(tmp_path, schedule={"warmup": [{"warmup_steps": 5}], "branch_cooldowns": True})
    sweep.write_plan(result, tmp_path / "sweep")
    for run_id in ("early_w32_trunk", "early_w32_t25.6k", "late_w64_t51.2k"):
        with pytest.raises(SystemExit) as exit_info:
            recipe = tmp_path / "sweep" / "recipes" / f"{run_id}.yaml"
            run_lightning_cli(["fit", "--config", str(recipe), "--print_config"])
        assert exit_info.value.code in (0, None), run_id
        printed = capsys.readouterr().out
        assert "fusionlab.training.markers.RunMarkers" in printed, run_id
    assert "CheckpointAtSteps" in (tmp_path / "sweep" / "recipes" / "early_w32_trunk.yaml").read_text()


def test_branches_follow_the_separate_runs_schedule(tmp_path, base_recipes):
    result = plan(
        tmp_path,
        budgets={"steps": [50, 80, 130, 200]},
        schedule={"warmup": [{"warmup_steps": 20}], "cooldown_fraction": 0.2, "branch_cooldowns": True},
    )
    runs = result.by_id()
    trunk = runs["early_w32_trunk"]
    trunk_recipe = result.recipes[trunk.id]
    T_max = trunk_recipe["trainer"]["max_steps"]
    assert T_max == 200
    assert trunk.steps == 160
    assert trunk.warmup_steps == 20
    checkpoint = trunk_recipe["trainer"]["callbacks"][-1]["init_args"]
    assert checkpoint["steps"] == [40, 64, 104, 160]
    assert checkpoint["stop_after_last"] is True
    assert trunk_recipe["trainer"]["limit_val_batches"] == 0
    assert trunk.log_dir.startswith("trunks/")

    branches = [run for run in result.runs if run.trunk == trunk.id]
    assert len(branches) == 4
    for branch in branches:
        recipe = result.recipes[branch.id]
        T, W, f = branch.steps, recipe["model"]["warmup_steps"], recipe["model"]["cooldown_fraction"]
        assert W == 20
        assert recipe["trainer"]["max_steps"] == T
        # the trunk's learning rate up to the branch point equals that of a separate run of T steps
        for step in range(branch.start_step):
            assert wsd_factor(step, T_max, W, f) == wsd_factor(step, T, W, f), (branch.id, step)
        assert wsd_factor(branch.start_step - 1, T, W, f) == 1.0
        assert wsd_factor(T - 1, T, W, f) < 0.5
        # and every model hyperparameter matches the trunk's, which LightningCLI restores from its checkpoint
        assert recipe["model"] == trunk_recipe["model"]
    # trunks first, so that a sequential launch never reaches a branch before its trunk
    kinds = [run.kind for run in result.runs]
    assert kinds.index("branch") > max(i for i, kind in enumerate(kinds) if kind == "trunk")


def test_branching_saves_flops_on_the_paper_grid(tmp_path, bpe_file):
    spec = sweep.load_spec(REPO / "recipes" / "sweeps" / "paper_scaling.yaml")
    result = sweep.plan_study(spec, tmp_path / "paper", {"data.tokenizer": str(bpe_file)})
    for architecture in ("early", "late", "moe"):
        runs = [run for run in result.runs if run.architecture == architecture]
        trunks = [run for run in runs if run.kind == "trunk"]
        branches = [run for run in runs if run.kind == "branch"]
        assert len(trunks) == 6
        assert len(branches) == 6 * 12
        separate = sum(6.0 * (run.N + run.N_v) * run.tokens for run in branches)
        planned = sum(run.flops for run in runs)
        assert separate / planned >= 2.0, architecture
        # the longest budget (286k steps) sets the shared warmup: 5k steps for runs over 15k steps
        assert {run.warmup_steps for run in runs} == {5000}
    assert result.flops_summary()["saving"] >= 2.0
    assert "a saving of 2." in sweep.format_plan(result)


@pytest.mark.parametrize("spec_path", STUDY_SPECS, ids=lambda p: p.name)
def test_every_study_spec_plans(spec_path, tmp_path, bpe_file):
    spec = sweep.load_spec(spec_path)
    overrides = {"data.tokenizer": str(bpe_file)} if "paper" in spec_path.name else {}
    result = sweep.plan_study(spec, tmp_path / "sweep", overrides, workdir=REPO)
    assert result.runs
    for run in result.runs:
        assert run.warmup_steps < run.steps


def test_isoflop_budgets_give_equal_compute(tmp_path, base_recipes):
    result = plan(tmp_path, budgets={"flops": [1e11, 4e11]})
    for run in result.runs:
        target = run.budget
        assert abs(6.0 * (run.N + run.N_v) * run.tokens - target) <= 6.0 * (run.N + run.N_v) * 512 / 2 + 1
    assert len({run.tokens for run in result.runs if run.budget == 1e11}) == 4  # one D per model size


def test_lr_list_plans_a_learning_rate_sweep(tmp_path, base_recipes):
    spec = yaml.safe_load(write_spec(tmp_path / "spec.yaml").read_text())
    spec["architectures"]["early"]["widths"] = {32: {"lr": [1e-3, 3e-3, 1e-2]}}
    del spec["architectures"]["late"]
    spec["budgets"] = {"steps": [40]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = sweep.plan_study(sweep.load_spec(tmp_path / "spec.yaml"), tmp_path / "sweep")
    expected = ["early_w32_lr0.001_s40", "early_w32_lr0.003_s40", "early_w32_lr0.01_s40"]
    assert [run.id for run in result.runs] == expected
    assert [run.lr for run in result.runs] == [1e-3, 3e-3, 1e-2]


def test_status_names_the_best_learning_rate(tmp_path, base_recipes, capsys):
    spec = yaml.safe_load(write_spec(tmp_path / "spec.yaml").read_text())
    spec["architectures"]["early"]["widths"] = {32: {"lr": [1e-3, 3e-3, 1e-2]}}
    del spec["architectures"]["late"]
    spec["budgets"] = {"steps": [40]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = sweep.plan_study(sweep.load_spec(tmp_path / "spec.yaml"), tmp_path / "sweep")
    sweep.write_plan(result, tmp_path / "sweep")
    for run, loss in zip(result.runs, (3.2, 3.1, 3.4)):
        log_dir = tmp_path / "sweep" / run.log_dir
        launch.write_marker(log_dir / "markers", "finished", steps=40)
        (log_dir / "summary.json").write_text(json.dumps({"val_loss": {"mean": loss}}))

    assert fusionlab_main(["sweep", "status", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    expected = "best lr early width 32 budget 40: 0.003 (mean val loss 0.001: 3.2000, 0.003: 3.1000, 0.01: 3.4000)"
    assert expected in printed


SPEC_ERRORS = [
    ({"budgets": {"tokens": [0]}}, "must be positive"),
    ({"budgets": {"tokens": [1e4], "steps": [3]}}, "exactly one of tokens, steps or flops"),
    ({"set": {"trainer.max_steps": 5}}, "trainer.max_steps is set by the planner"),
    ({"set": {"model.lr": 1e-3}}, "model.lr is set by the planner"),
    ({"schedule": {"warmup": [{"warmup_steps": 30}]}}, "warmup steps do not end before the cooldown"),
    ({"schedule": {"warmup": [{"below_steps": 10, "warmup_steps": 1}]}}, "the last row must have no below_steps"),
    ({"schedule": {"cooldown_fraction": 1.5}}, "cooldown_fraction = 1.5 is invalid"),
    ({"schedule": {"warmup": [{"warmup_steps": 22}], "branch_cooldowns": True}},
     "(branches share the warmup of the longest budget)"),
    ({"budget": {"steps": [3]}}, "unknown keys ['budget']"),
    ({"slurm": {"gpus": 2}}, "unknown slurm options ['gpus']"),
    ({"architectures": {"early": {"recipe": "early.yaml", "widths": {32: {}}}}}, "missing 'lr'"),
    ({"architectures": {"early": {"recipe": "early.yaml", "widths": {32: {"lr": 1e-3}},
                                  "width_keys": {"model.backbone.init_args.d_model": 0.3}}}}, "is not an integer"),
    ({"architectures": {"early": {"recipe": "missing.yaml", "widths": {32: {"lr": 1e-3}}}}},
     "cannot read the recipe"),
]


@pytest.mark.parametrize(("changes", "message"), SPEC_ERRORS, ids=[m for _, m in SPEC_ERRORS])
def test_invalid_spec_is_rejected(tmp_path, base_recipes, changes, message):
    with pytest.raises(SpecError) as error:
        plan(tmp_path, **changes)
    assert message in str(error.value)


def test_replanning_a_different_study_needs_force(tmp_path, base_recipes):
    sweep.write_plan(plan(tmp_path), tmp_path / "sweep")
    sweep.write_plan(plan(tmp_path), tmp_path / "sweep")  # the same plan again is fine
    old_result = tmp_path / "sweep" / "runs" / "early" / "early_w32_t12.8k" / "summary.json"
    old_result.parent.mkdir(parents=True)
    old_result.write_text("{}")

    changed_recipe = plan(tmp_path, set={"model.weight_decay": 0.1})
    with pytest.raises(SpecError, match="already contains a different sweep plan"):
        sweep.write_plan(changed_recipe, tmp_path / "sweep")
    sweep.write_plan(changed_recipe, tmp_path / "sweep", force=True)
    assert not old_result.exists()  # a changed run never keeps the old run's results
    kept = list((tmp_path / "sweep" / "runs" / "early").glob("early_w32_t12.8k.replaced-*/summary.json"))
    assert len(kept) == 1

    other = plan(tmp_path, budgets={"steps": [30]})
    with pytest.raises(SpecError, match="already contains a different sweep plan"):
        sweep.write_plan(other, tmp_path / "sweep")
    sweep.write_plan(other, tmp_path / "sweep", force=True)
    assert len(sweep.load_manifest(tmp_path / "sweep")["runs"]) == 4


# --------------------------------------------------------------------------------- job scripts


def test_dry_run_writes_array_job_scripts(tmp_path, base_recipes):
    result = plan(tmp_path, schedule={"warmup": [{"warmup_steps": 5}], "branch_cooldowns": True})
    sweep.write_plan(result, tmp_path / "sweep")
    options = launch.SlurmOptions.from_mapping({
        "partition": "gpu", "time_min": 30, "cpus_per_task": 6, "gpus_per_task": 1, "mem_gb": 32,
        "container": "/images/fusionlab.sif", "sbatch": {"account": "proj", "exclusive": True},
        "setup": ["module load cuda"], "signal_delay_s": 120,
    })
    submissions = launch.submit_slurm(tmp_path / "sweep", options, dry_run=True, echo=lambda _: None)
    assert [len(s["tasks"]) for s in submissions] == [4, 12]  # trunks, then branches
    trunks = (tmp_path / "sweep" / "slurm" / "dry-run" / "array-0.sh").read_text()
    branches = (tmp_path / "sweep" / "slurm" / "dry-run" / "array-1.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --cpus-per-task=6",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --mem=32768MB", "#SBATCH --account=proj",
                 "#SBATCH --exclusive", "#SBATCH --signal=USR2@120", "#SBATCH --array=0-3%4",
                 "module load cuda", f"cd {tmp_path}"):
        assert line in trunks, line
    assert "apptainer exec --nv --bind" in trunks
    assert "/images/fusionlab.sif python -u -m submitit.core._submit" in trunks
    assert "#SBATCH --dependency=afterany:ARRAY0" in branches
    assert "#SBATCH --array=0-11%12" in branches
    tasks = json.loads((tmp_path / "sweep" / "slurm" / "dry-run" / "array-1.json").read_text())["tasks"]
    assert tasks["early_w32_t12.8k"] == "ARRAY1_0"
    assert not (tmp_path / "sweep" / launch.SUBMISSIONS_FILE).exists()


def test_dry_run_with_enroot_uses_srun_container(tmp_path, base_recipes):
    sweep.write_plan(plan(tmp_path), tmp_path / "sweep")
    options = launch.SlurmOptions.from_mapping({"container": "nvcr.io#nvidia/pytorch:24.05-py3",
                                                "container_runtime": "enroot"})
    launch.submit_slurm(tmp_path / "sweep", options, dry_run=True, echo=lambda _: None)
    script = (tmp_path / "sweep" / "slurm" / "dry-run" / "array-0.sh").read_text()
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in script
    assert f"--container-workdir={tmp_path}" in script
    assert " python -u -m submitit.core._submit" in script


def test_slurm_options_reject_unknown_keys():
    with pytest.raises(SpecError, match="unknown slurm options \\['gpus'\\]"):
        launch.SlurmOptions.from_mapping({"gpus": 2})
    with pytest.raises(SpecError, match="container_runtime = 'docker'"):
        launch.SlurmOptions.from_mapping({"container_runtime": "docker"})


# ---------------------------------------------------------------------------------- run states


def _planned_sweep(tmp_path) -> tuple[Path, dict]:
    result = plan(tmp_path, budgets={"steps": [30, 60]})
    sweep.write_plan(result, tmp_path / "sweep")
    return tmp_path / "sweep", {run.id: run for run in result.runs}


def _markers(sweep_dir: Path, run) -> Path:
    return sweep_dir / run.log_dir / "markers"


def test_states_from_markers_and_squeue(tmp_path, base_recipes):
    sweep_dir, runs = _planned_sweep(tmp_path)
    host, now = socket.gethostname(), time.time()
    ids = sorted(runs)

    # finished
    launch.write_marker(_markers(sweep_dir, runs[ids[0]]), "started", attempt=1, host=host, pid=1, slurm_job=None)
    launch.write_marker(_markers(sweep_dir, runs[ids[0]]), "finished", steps=30)
    # failed, with its log
    launch.write_marker(_markers(sweep_dir, runs[ids[1]]), "started", attempt=2, host=host, pid=1, slurm_job=None)
    launch.write_marker(_markers(sweep_dir, runs[ids[1]]), "stopped", reason="failed", error="ValueError: bad",
                        log="/logs/x.log")
    # started locally by a process that no longer exists, no marker: interrupted
    launch.write_marker(_markers(sweep_dir, runs[ids[2]]), "started", attempt=1, host=host, pid=2**22 + 12345,
                        slurm_job=None)
    # SLURM tasks: running, pending, vanished, and one cancelled by scancel
    for i, job in zip((3, 4, 5, 6), ("7_0", "7_1", "7_2", "7_3")):
        launch.write_marker(_markers(sweep_dir, runs[ids[i]]), "started", attempt=1, host="node1", pid=10,
                            slurm_job=job)
    launch.write_marker(_markers(sweep_dir, runs[ids[6]]), "stopped", reason="cancelled", error="SIGTERMException: ")
    submissions = [{"launcher": "slurm", "job_id": "7", "tasks": {ids[i]: f"7_{i - 3}" for i in (3, 4, 5, 6)}}]
    (sweep_dir / launch.SUBMISSIONS_FILE).write_text(json.dumps(submissions))

    squeue = {"7_0": "RUNNING", "7_1": "PENDING"}
    states = {s.id: s for s in launch.run_states(sweep_dir, squeue, now=now)}
    assert states[ids[0]].state == "finished"
    assert states[ids[1]].state == "failed"
    assert states[ids[1]].log == "/logs/x.log"
    assert states[ids[1]].attempts == 2
    assert states[ids[2]].state == "interrupted"
    assert states[ids[3]].state == "running"
    assert states[ids[4]].state == "queued"
    assert states[ids[5]].state == "interrupted"
    assert states[ids[6]].state == "cancelled"
    assert states[ids[7]].state == "planned"

    # without squeue, a SLURM task is judged by its last sign of life
    stale = {s.id: s for s in launch.run_states(sweep_dir, None, now=now + 3600)}
    fresh = {s.id: s for s in launch.run_states(sweep_dir, None, now=now)}
    assert stale[ids[3]].state == "interrupted"
    assert fresh[ids[3]].state == "running"


def test_requeued_task_is_queued_until_it_restarts(tmp_path, base_recipes):
    sweep_dir, runs = _planned_sweep(tmp_path)
    run_id = sorted(runs)[0]
    markers = _markers(sweep_dir, runs[run_id])
    launch.write_marker(markers, "started", attempt=1, host="node1", pid=10, slurm_job="9_0")
    launch.write_marker(markers, "stopped", reason="requeued", error="SystemExit: -1")
    (sweep_dir / launch.SUBMISSIONS_FILE).write_text(json.dumps([{"job_id": "9", "tasks": {run_id: "9_0"}}]))
    assert {s.id: s.state for s in launch.run_states(sweep_dir, {"9_0": "PENDING"})}[run_id] == "queued"
    assert {s.id: s.state for s in launch.run_states(sweep_dir, {})}[run_id] == "interrupted"


def test_branch_of_failed_trunk_is_blocked(tmp_path, base_recipes):
    result = plan(tmp_path, schedule={"warmup": [{"warmup_steps": 5}], "branch_cooldowns": True})
    sweep.write_plan(result, tmp_path / "sweep")
    trunk = result.by_id()["early_w32_trunk"]
    launch.write_marker(tmp_path / "sweep" / trunk.log_dir / "markers", "started", attempt=1, host="h", pid=1)
    launch.write_marker(tmp_path / "sweep" / trunk.log_dir / "markers", "stopped", reason="failed", error="x")
    states = {s.id: s for s in launch.run_states(tmp_path / "sweep", None)}
    assert states["early_w32_t12.8k"].state == "blocked"
    assert "early_w32_trunk (failed)" in states["early_w32_t12.8k"].detail
    assert states["early_w64_t12.8k"].state == "planned"


# ------------------------------------------------------------------------------- command line


def test_sweep_command_plans_and_reports(tmp_path, base_recipes, capsys, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", schedule={"warmup": [{"warmup_steps": 5}], "branch_cooldowns": True})
    monkeypatch.chdir(tmp_path)
    assert fusionlab_main(["sweep", "plan", str(spec), "--out", "sweep", "--set", "data.num_workers=0"]) == 0
    printed = capsys.readouterr().out
    assert "study tiny: 16 runs" in printed
    assert "a saving of" in printed
    recipe = yaml.safe_load((tmp_path / "sweep" / "recipes" / "early_w32_trunk.yaml").read_text())
    assert recipe["data"]["num_workers"] == 0
    assert json.loads((tmp_path / "sweep" / "manifest.json").read_text())["workdir"] == str(tmp_path)

    assert fusionlab_main(["sweep", "status", "sweep"]) == 0
    printed = capsys.readouterr().out
    assert "early_w32_trunk" in printed
    assert "planned: 16" in printed

    assert fusionlab_main(["sweep", "status", "sweep", "--json"]) == 0
    states = json.loads(capsys.readouterr().out)
    assert len(states) == 16
    assert {s["state"] for s in states} == {"planned"}

    assert fusionlab_main(["sweep", "run", "missing-dir"]) == 1
    assert "fusionlab sweep plan SPEC --out missing-dir" in capsys.readouterr().err


def test_overview_lists_sweep(capsys):
    assert fusionlab_main(["--help"]) == 0
    assert "sweep plan|run|status" in capsys.readouterr().out
