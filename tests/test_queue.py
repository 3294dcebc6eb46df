"""``batchuq queue``: the most informative images, round-robin over the predicted classes, never
one queued on an earlier night, as a Label Studio import file and CSV."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_TEST

from batchuq.cli import cli
from batchuq.errors import UsageError
from batchuq.jobs.queue import queue_images, round_robin
from batchuq.jobs.score import ScoreOptions, score_directory
from batchuq.output.schema import METADATA_KEY

# Label Studio's image classification template (https://labelstud.io/templates/image_classification)
# with the bundled digits model's classes as choices.
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="choice" toName="image">'
    + "".join(f'<Choice value="n{i}"/>' for i in range(10))
    + "</Choices></View>"
)


def check_label_studio_import(tasks: object, config: str) -> None:
    """Check a Label Studio import file against the documented format and a labelling config.

    https://labelstud.io/guide/predictions and https://labelstud.io/guide/tasks ("Basic Label
    Studio JSON format"): a list of tasks; each has a ``data`` object holding every variable
    (``$image``) the config's object tags read, and a ``predictions`` list; each prediction has
    a ``result`` list, an optional ``score`` in [0, 1] and ``model_version``; each result
    names its control (``from_name``) and object (``to_name``), has the control's ``type`` and
    a ``value`` keyed by that type, holding choices the control offers, and an ``id`` unique
    across the file.
    """
    view = ET.fromstring(config)
    objects = {tag.get("name"): tag for tag in view.iter() if tag.get("value", "")[:1] == "$"}
    controls = {tag.get("name"): tag for tag in view.iter("Choices")}
    ids = []
    assert isinstance(tasks, list) and tasks
    for task in tasks:
        assert set(task) == {"data", "predictions"}
        for tag in objects.values():
            assert isinstance(task["data"][tag.get("value")[1:]], str)
        assert isinstance(task["predictions"], list) and len(task["predictions"]) == 1
        for prediction in task["predictions"]:
            assert isinstance(prediction["model_version"], str) and prediction["model_version"]
            assert 0.0 <= prediction["score"] <= 1.0
            for result in prediction["result"]:
                control = controls[result["from_name"]]
                assert result["to_name"] in objects
                assert result["to_name"] == control.get("toName")
                assert result["type"] == control.tag.lower() == "choices"
                assert set(result["value"]) == {"choices"}
                offered = {choice.get("value") for choice in control.iter("Choice")}
                assert result["value"]["choices"] and set(result["value"]["choices"]) <= offered
                ids.append(result["id"])
    assert len(ids) == len(set(ids))


def test_the_format_check_catches_what_label_studio_refuses() -> None:
    good = {
        "data": {"image": "/x.png"},
        "predictions": [
            {
                "model_version": "m",
                "score": 0.5,
                "result": [
                    {
                        "id": "a",
                        "from_name": "choice",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": ["n1"]},
                    }
                ],
            }
        ],
    }
    check_label_studio_import([good], LABEL_CONFIG)
    for path, bad in [
        (("data",), {"img": "/x.png"}),
        (("predictions", 0, "score"), 1.5),
        (("predictions", 0, "result", 0, "from_name"), "label"),
        (("predictions", 0, "result", 0, "type"), "labels"),
        (("predictions", 0, "result", 0, "value"), {"choices": ["cat"]}),
    ]:
        task = json.loads(json.dumps(good))
        where = task
        for key in path[:-1]:
            where = where[key]
        where[path[-1]] = bad
        with pytest.raises((AssertionError, KeyError)):
            check_label_studio_import([task], LABEL_CONFIG)
    with pytest.raises(AssertionError):  # two results with one id
        check_label_studio_import([good, good], LABEL_CONFIG)


def test_round_robin_takes_each_class_in_turn_most_informative_first() -> None:
    rows = pd.DataFrame(
        {
            "path": [f"{c}{i}.png" for c, i in ["a1", "a2", "a3", "a4", "b1", "b2", "c1"]],
            "pred": ["a", "a", "a", "a", "b", "b", "c"],
            "confidence": [0.5] * 7,
            "mutual_info": [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.5],
            "margin": [0.1, 0.2, 0.3, 0.4, 0.05, 0.5, 0.6],
        }
    )
    rows["image"] = "/n/" + rows["path"]
    picked = round_robin(rows, "mutual_info", False, 6)
    assert picked["path"].tolist() == ["a1.png", "c1.png", "b1.png", "a2.png", "b2.png", "a3.png"]
    assert picked["round"].tolist() == [0, 0, 0, 1, 1, 2]
    assert picked["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    by_margin = round_robin(rows, "margin", True, 4)  # the smallest margin first
    assert by_margin["path"].tolist() == ["b1.png", "a1.png", "c1.png", "a2.png"]
    shuffled = rows.sample(frac=1.0, random_state=0)
    assert round_robin(shuffled, "mutual_info", False, 6).equals(picked)


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> dict[str, Path]:
    """A history of three nights: the third scores the first's images again (as after a rerun of
    the cameras' upload), each with one unreadable file."""
    work = tmp_path_factory.mktemp("queue")
    folders = {}
    for name, first in [("a", 0), ("b", 4)]:
        root = work / "in" / name
        for folder in sorted(SAMPLE_TEST.iterdir()):
            (root / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[first : first + 3]:
                shutil.copy(image, root / folder.name / image.name)
        (root / "n0" / "broken.png").write_bytes(b"not a png")
        folders[name] = root
    options = ScoreOptions(passes=5, batch_size=16)
    history = work / "history"
    for date, name in [("2026-12-01", "a"), ("2026-12-02", "b"), ("2026-12-03", "a")]:
        score_directory(folders[name], history, options, partition=f"date={date}")
    return {"work": work, "history": history, **folders}


def run_queue(*args: str) -> str:
    result = CliRunner().invoke(cli, ["queue", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_two_nights_never_queue_an_image_twice(nights) -> None:
    work, history = nights["work"], nights["history"]
    queue = work / "queue"
    picked = {}
    for date in ("2026-12-01", "2026-12-02", "2026-12-03"):
        out = work / f"tasks-{date}.json"
        run_queue(str(history / f"date={date}"), "-n", "8", "-o", str(out), "--history", str(queue))
        tasks = json.loads(out.read_text())
        check_label_studio_import(tasks, LABEL_CONFIG)
        picked[date] = [task["data"]["image"] for task in tasks]
        table = pd.read_csv(out.with_suffix(".csv"))
        assert table["image"].tolist() == picked[date] and len(table) == 8
        assert table["pred"].nunique() >= 6  # spread over the predicted classes
        assert not any(image.endswith("broken.png") for image in picked[date])  # error rows
    everything = sum(picked.values(), [])
    assert len(everything) == len(set(everything)) == 24
    assert all(Path(image).is_file() for image in everything)  # absolute paths of the images
    assert all(image.startswith(str(nights["a"])) for image in picked["2026-12-03"])

    # Night 1's picks: the most informative image of each of 8 predicted classes (round 0).
    first = pd.read_parquet(history / "date=2026-12-01")
    first = first[first["status"] == "ok"].sort_values(["mutual_info", "path"], ascending=[0, 1])
    tops = first.groupby("pred").head(1)
    assert len(tops) >= 8
    assert picked["2026-12-01"] == [str(nights["a"] / p) for p in tops["path"][:8]]

    # A rerun of a night replaces its own picks: the same images again.
    again = work / "again.json"
    run_queue(
        str(history / "date=2026-12-03"), "-n", "8", "-o", str(again), "--history", str(queue)
    )
    assert [t["data"]["image"] for t in json.loads(again.read_text())] == picked["2026-12-03"]
    remembered = pd.read_parquet(queue)
    assert remembered.groupby("date", observed=True).size().to_dict() == {
        "2026-12-01": 8,
        "2026-12-02": 8,
        "2026-12-03": 8,
    }


def test_url_prefix_model_version_and_names(nights) -> None:
    out = nights["work"] / "url.json"
    prefix = "/data/local-files/?d=incoming/2026-12-02/"
    run_queue(
        str(nights["history"] / "date=2026-12-02" / "part-0.parquet"),
        "-n",
        "3",
        "-o",
        str(out),
        "--url-prefix",
        prefix,
        "--by",
        "margin",
        "--from-name",
        "digit",
    )
    tasks = json.loads(out.read_text())
    assert all(t["data"]["image"] == prefix + t["data"]["path"] for t in tasks)
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"].startswith("digits_cnn.keras@")
    assert prediction["result"][0]["from_name"] == "digit" and "margin" in tasks[0]["data"]
    margins = [t["data"]["margin"] for t in tasks]
    frame = pd.read_parquet(nights["history"] / "date=2026-12-02")
    assert margins[0] == pytest.approx(frame.loc[frame["status"] == "ok", "margin"].min())


def test_ood_ranks_by_knn_distance_or_falls_back_to_entropy(nights, tmp_path, caplog) -> None:
    part = nights["history"] / "date=2026-12-02" / "part-0.parquet"
    queue = queue_images(part, 5, by="ood")
    assert queue.column == "entropy" and "knn_distance" in caplog.text
    table = pq.read_table(part)
    distance = pa.array([float(i) for i in range(table.num_rows)], pa.float32())
    with_knn = tmp_path / "knn.parquet"
    pq.write_table(table.append_column("knn_distance", distance), with_knn)
    queue = queue_images(with_knn, 5, by="ood")
    ok = table.to_pandas()["status"] == "ok"
    assert queue.column == "knn_distance"
    assert queue.tasks["score"].tolist()[0] == float(ok[ok].index.max())
    with pytest.raises(UsageError, match="'mutual_info'"):
        pq.write_table(table.drop_columns(["mutual_info"]), tmp_path / "old.parquet")
        queue_images(tmp_path / "old.parquet", 5)


def test_usage_errors_and_an_empty_night(nights, tmp_path) -> None:
    part = nights["history"] / "date=2026-12-01"
    runner = CliRunner()
    result = runner.invoke(cli, ["queue", str(part), "-o", str(tmp_path / "no/t.json")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(cli, ["queue", str(part), "-o", str(tmp_path / "t.txt")])
    assert result.exit_code == 2 and ".json" in result.output
    result = runner.invoke(cli, ["queue", str(part), "-o", "t.json", "--night", "x"])
    assert result.exit_code == 2 and "Received: night='x'" in result.output
    empty = tmp_path / "empty.parquet"
    schema = pq.read_schema(part / "part-0.parquet")
    pq.write_table(schema.empty_table().replace_schema_metadata(schema.metadata), empty)
    assert METADATA_KEY in pq.read_schema(empty).metadata
    result = runner.invoke(cli, ["queue", str(empty), "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 4, result.output


def test_options_come_from_the_config_file(nights, tmp_path) -> None:
    config = tmp_path / "batchuq.toml"
    config.write_text('[queue]\nby = "entropy"\ncount = 2\nhistory = "queue"\n')
    out = tmp_path / "t.json"
    run_queue(str(nights["history"] / "date=2026-12-02"), "-o", str(out), "--config", str(config))
    remembered = pd.read_parquet(tmp_path / "queue")  # relative to the config file's folder
    assert len(remembered) == 2 and set(remembered["by"]) == {"entropy"}
