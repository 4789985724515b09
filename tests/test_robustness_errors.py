"""Entry points end a user's mistake in one line: through framework wrappers, for unset settings, for unquoted paths."""

from __future__ import annotations

import logging

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from reid.errors import CatalogueError, command_line_problem, run_and_report, user_error_message


def _exit_message(run, caplog: pytest.LogCaptureFixture) -> str:
    caplog.set_level(logging.ERROR, logger="reid")
    with pytest.raises(SystemExit) as exited:
        run_and_report(run, what="testing")
    assert exited.value.code == 1
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_an_importer_error_inside_hydras_instantiation_error_is_one_line(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    def run():
        instantiate({"_target_": "reid.importers.import_labels_csv", "path": str(tmp_path / "labels.csv")})

    message = _exit_message(run, caplog)
    assert message == f"{tmp_path / 'labels.csv'}: file not found; check the path"


def test_an_error_raised_while_handling_a_reid_error_still_shows_the_reid_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def run():
        try:
            raise CatalogueError("labels.csv row 17: side 'lft' is not one of left, right, unknown")
        except CatalogueError:
            raise RuntimeError("a handler failed")  # noqa: B904 - a careless wrapper leaves only the implicit context

    assert _exit_message(run, caplog) == "labels.csv row 17: side 'lft' is not one of left, right, unknown"


def test_an_unset_mandatory_setting_names_the_setting_and_how_to_set_it(caplog: pytest.LogCaptureFixture) -> None:
    cfg = OmegaConf.create({"data": {"source": {"path": "???"}}})

    def run():
        instantiate({"_target_": "builtins.str", "object": cfg.data.source.path})

    message = _exit_message(run, caplog)
    assert message.startswith(
        "setting data.source.path is required: set it on the command line, e.g. data.source.path="
    )
    assert "'data.source.path=\"/path/to/my data\"'" in message and "\n" not in message
    caplog.clear()
    share = OmegaConf.create({"namespace": "???"})
    message = _exit_message(lambda: share.namespace, caplog)
    assert message == "setting namespace is required: set it on the command line, e.g. namespace=..."


def test_a_bug_keeps_its_traceback() -> None:
    def run():
        raise KeyError("query")

    with pytest.raises(KeyError):
        run_and_report(run, what="testing")
    assert user_error_message(ValueError("x")) is None


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["mode=build", "data.source.path=/data/Camera", "Trap", "2023/labels.csv", "gallery=g"],
            "'Trap' after 'data.source.path=/data/Camera' is not a setting (key=value); if it is part of a path "
            "with spaces, quote the whole setting: 'data.source.path=\"/data/Camera Trap 2023/labels.csv\"'",
        ),
        (
            ["data.source.path=/data/Леопарды/labels.csv"],
            "must be in quotes on the command line: 'data.source.path=\"/data/Леопарды/labels.csv\"'",
        ),
    ],
)
def test_unquoted_paths_on_the_command_line_get_the_quoted_form(argv: list[str], said: str) -> None:
    assert said in (command_line_problem(argv) or "")


@pytest.mark.parametrize(
    "argv",
    [
        ["mode=build", "--cfg", "job"],
        ["-m", "model=resnet18,tiny", "+experiment=nyala", "~logger"],
        ['data.source.path="/data/Камера Trap/labels.csv"'],
        ["data.source.path=/data/Camera Trap 2023/labels.csv"],  # one argument: the shell kept it together
    ],
)
def test_well_formed_command_lines_pass(argv: list[str]) -> None:
    assert command_line_problem(argv) is None
