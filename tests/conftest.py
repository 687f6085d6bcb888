"""Fixtures shared by every test: a clean environment, Accelerate state and process group per test."""

from __future__ import annotations

import os
import sys

import pytest

# What `bash tests/run.sh --fast` leaves out (marked `slow`): whole modules of many real processes, tests
# that share a multi-process fixture, and single tests of several CLI runs (over ~3 s each on 2 idle cores).
SLOW_MODULES = {
    "test_slurm",
    "test_restart",
    "test_promise_matrix_e2e",
    "test_samplers",
    "test_streaming_resume",
    "test_split_streams",
    "test_hf_batches",
    "test_bench",
    "test_fsdp",
}
# Run alone after the rest, which runs on two pytest workers (tests/run.sh): their checks race real clocks
# (hang and startup timeouts, signals, SLURM's scheduler) that a test running beside them would slow.
SERIAL_MODULES = {"test_slurm", "test_watchdog", "test_launch", "test_restart"}
SLOW_FIXTURES = {"two_process_run", "overfit_runs", "reference@test_checkpoint", "runs@test_evaluation"}
SLOW_TESTS = {
    # test_throughput: a 2-rank run; test_ema: kill and resume on 1 and 2 ranks
    "test_sigkill_then_resume_with_ema_is_bitwise_identical",
    "test_ema_under_fsdp2_is_sharded_resumes_bitwise_and_reshards",
    "test_two_ranks_with_accumulation_report_per_device_and_global_figures",
    # test_launch: real launches
    "test_doctor_names_disagreeing_configs_and_a_node_count_mismatch",
    "test_doctor_names_an_unreachable_main_address",
    "test_doctor_fails_when_the_smoke_test_times_out",
    "test_doctor_fails_when_the_process_group_does_not_form",
    "test_sigterm_to_one_rank_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run",
    "test_a_killed_rank_ends_the_whole_job_naming_it",
    "test_a_dead_launcher_stops_its_workers_and_the_rerun_resumes_bitwise",
    "test_preemption_side_group_uses_the_collective_timeout",
    # test_checkpoint
    "test_resume_on_another_world_size_sees_each_sample_once_per_epoch",
    "test_full_disk_is_a_clear_error_and_leaves_checkpoints_untouched",
    "test_lifecycle_keep_last_keep_best_auto_and_corrupt_checkpoints",
    # test_core, test_fastdata, test_features
    "test_two_ranks_match_one_rank_at_the_same_global_batch",
    "test_gathered_val_loss_is_the_exact_mean",
    "test_two_ranks_train_bitwise_alike_on_both_paths",
    "test_auto_batch_size_and_early_stopping_agree_across_ranks",
    "test_nonfinite_stop_names_step_batch_and_rank",
    "test_fast_dev_run_with_anomaly_detection_on_two_ranks",
    "test_transformers_model_trains_on_one_and_two_ranks",
    # test_exactness
    "test_continuing_a_per_sample_dataset_run_is_the_straight_run",
    "test_a_finished_run_trains_nothing_more",
    "test_a_changed_lr_on_resume_is_applied_and_said",
    "test_a_changed_schedule_on_resume_follows_the_new_budget",
    "test_a_resume_with_a_larger_step_trains_every_remaining_epoch_whole",
    "test_a_change_the_checkpoint_cannot_take_is_refused_before_training",
    "test_a_second_run_on_a_busy_output_dir_is_refused",
    "test_accumulation_equals_the_big_batch_on_uneven_data",
    "test_an_unused_parameter_on_two_ranks_is_named_or_allowed",
    "test_a_full_disk_at_the_final_save_is_one_line_and_keeps_the_checkpoints",
    "test_a_skipped_step_leaves_batchnorm_statistics_untouched",
    # test_exact_tail: every data source on 1, 2 and 3 ranks
    "test_every_data_source_trains_each_id_once_per_epoch_on_1_2_3_ranks",
    # test_streaming, test_watchdog
    "test_each_streamed_sample_is_trained_on_once_per_epoch",
    "test_a_schedule_that_needs_the_length_asks_for_max_steps",
    "test_a_mid_epoch_checkpoint_of_a_stream_is_refused_not_restarted",
    "test_a_rank_asleep_in_forward_fails_the_job_in_time_naming_it",
    "test_a_slow_rank_is_named_in_the_records_and_warned_about",
}


# tests/run.sh runs the non-serial tests on two xdist workers, a whole file at a time (--dist loadfile). xdist hands out
# the files with the most tests first, but a file's cost follows its real processes, not its count of tests (the few
# tests of test_exact_tail take minutes): a long file handed out late keeps one worker busy while the other, done,
# waits. So the longest files (measured on 2 cores) go first, and the many short ones fill in at the end
# (tests/run.sh passes --no-loadscope-reorder, so that xdist keeps this order).
LONGEST_FILES_FIRST = [
    "test_fsdp",
    "test_streaming_resume",
    "test_promise_matrix_e2e",
    "test_split_streams",
    "test_exactness",
    "test_samplers",
    "test_exact_tail",
    "test_features",
    "test_evaluation",
    "test_checkpoint",
    "test_bench",
]


def pytest_collection_modifyitems(config, items):
    """Markers by rule, so a new test is classified without remembering to: `slurm` for the SLURM sandbox,
    `gpu` for tests skipped without CUDA, `slow` for those and for every test with several ranks. Then the
    longest files first (LONGEST_FILES_FIRST), each file's tests in their order."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        nproc = getattr(item, "callspec", None) and item.callspec.params.get("nproc", 1)
        gpu = any("GPU" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))
        if module == "test_slurm":
            item.add_marker(pytest.mark.slurm)
        if module in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
        if gpu:
            item.add_marker(pytest.mark.gpu)
        fixtures = set(getattr(item, "fixturenames", ())) | {f"{name}@{module}" for name in getattr(item, "fixturenames", ())}
        name = item.name.split("[")[0]
        if module in SLOW_MODULES or (nproc or 1) > 1 or name in SLOW_TESTS or fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
    rank = {module: i for i, module in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable


def pytest_terminal_summary(terminalreporter):
    """The seed the sampled real-process matrices were drawn by (tests/helpers.py), at the end of every run, -q too:
    a failure in one replays with the same seed."""
    from helpers import FULL_MATRIX, MATRIX_SEED

    drawn = "every case (DIST_TRAIN_FULL_MATRIX=1)" if FULL_MATRIX else "a sample; DIST_TRAIN_FULL_MATRIX=1 runs every case"
    terminalreporter.write_line(f"sampled matrices: DIST_TRAIN_MATRIX_SEED={MATRIX_SEED}, {drawn}")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, tmp_path_factory, monkeypatch):
    """Each test runs in its own tmp dir, with env vars, sys.path, the user modules it imported and
    Accelerate's singletons restored afterwards."""
    saved_env = dict(os.environ)
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    # Seed projects of different tests share module names (`dataset`, `model`): an in-process run must
    # import its own project's siblings, not the previous test's cached ones.
    sys.path[:] = saved_path
    test_files = str(tmp_path_factory.getbasetemp())
    for name in set(sys.modules) - saved_modules:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(test_files):
            del sys.modules[name]
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    PartialState._reset_state()
