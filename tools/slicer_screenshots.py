"""Make SlicerHLIP's screenshots with Slicer's own views, offscreen, from a real answer of a model.

    .venv/bin/python tools/slicer_screenshots.py --checkpoint demo_output/run/final \
        --studies demo_output/test/studies --out Screenshots

It starts ``monailabel start_server`` with the checkpoint and the held-out studies, builds Slicer's
scene, module logics and views from the slicer-core wheel (tests/slicer_harness.py), loads each
candidate study's scans with Slicer's Volumes logic, asks the demo's findings through the module's
logic (SlicerHLIPLogic: the files are written by Slicer's writer, the answer becomes the findings
table node and the heat-map node), and for the first study whose planted finding the model flags
writes:

- ``SlicerHLIP-four-up.png``: Slicer's Four-Up layout (Red, Yellow, Green slice views and the 3D
  view) with that finding's heat map over its scan and the colour legend, drawn by Slicer's slice
  logics and displayable managers;
- ``SlicerHLIP-findings.png``: the findings table node's cells (drawn with VTK text actors: the
  Qt table view of the Slicer application is not in slicer-core), flagged rows highlighted as
  the panel highlights them.

It prints the round-trip time of each question (volumes written by Slicer's writer and sent, the
answer shown as the findings table and the heat map over its scan), measured around the module's
logic; ``--round-trips N`` asks the chosen study N more times and prints median, min and max.
Needs requirements-slicer.txt.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the harness and the server launcher are the tests' own

from server_helpers import monailabel_server  # noqa: E402
from slicer_harness import SlicerApplication, write_png  # noqa: E402

# label column of the demo's reports.csv -> the finding asked (the first positive phrasing of
# hlip_core/demo/prompts.json for it)
FOCAL = ("mass", "haemorrhage", "infarct")


def demo_findings() -> dict:
    prompts = json.loads((REPO / "hlip_core" / "demo" / "prompts.json").read_text())
    return {f["column"]: f["positive"][0].rstrip(".") for f in prompts["findings"]}


def candidates(studies: Path, limit: int) -> list:
    """(study id, planted focal finding) of held-out studies with exactly one focal finding."""
    out = []
    with open(studies.parent / "reports.csv", newline="") as f:
        for row in csv.DictReader(f):
            planted = [c for c in FOCAL if row.get(c) == "1"]
            if len(planted) == 1 and (studies / row["study_id"]).is_dir():
                out.append((row["study_id"], planted[0]))
    return out[:limit]


def render_table(table, flagged_rows, path, row_height=30):
    """The findings table node's cells as an image (header row, then one row per finding)."""
    import vtk

    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = [[table.GetCellText(r, c) for c in range(len(columns))] for r in range(table.GetNumberOfRows())]
    for row in rows:  # numbers as the panel shows them
        for c in (1, 2):
            row[c] = f"{float(row[c]):.3f}"
    widths = [max(len(columns[c]), *(len(r[c]) for r in rows)) for c in range(len(columns))]
    height = row_height * (len(rows) + 1) + 10
    width = 24 + int(10.5 * (sum(widths) + 2 * (len(widths) - 1)))  # Courier at 17 px: ~10.2 px a character
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(1, 1, 1)
    window.AddRenderer(renderer)
    for i, cells in enumerate([columns] + rows):
        text = vtk.vtkTextActor()
        text.SetInput("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(cells)))
        prop = text.GetTextProperty()
        prop.SetFontFamilyToCourier()
        prop.SetFontSize(17)
        prop.SetColor(0.1, 0.1, 0.1)
        prop.SetBold(i == 0 or (i - 1) in flagged_rows)
        if i > 0 and (i - 1) in flagged_rows:
            prop.SetBackgroundColor(1.0, 0.55, 0.0)
            prop.SetBackgroundOpacity(0.43)
        text.SetPosition(12, height - (i + 1) * row_height)
        renderer.AddViewProp(text)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    window.Finalize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="model checkpoint folder (the demo's: demo_output/run/final)")
    parser.add_argument("--studies", required=True, type=Path, help="held-out studies, one folder per study, reports.csv beside it")
    parser.add_argument("--out", type=Path, default=REPO / "Screenshots", help="where the PNG files go (default: Screenshots/)")
    parser.add_argument("--tries", type=int, default=8, help="studies asked at most, to find one whose planted finding is flagged")
    parser.add_argument("--round-trips", type=int, default=0, help="ask the chosen study this many more times and print the times")
    parser.add_argument("--dicom-series", type=Path, help="also time the round trip of this DICOM series folder (loaded by Slicer)")
    parser.add_argument("--view-size", type=int, default=400, help="pixels of each view of the Four-Up layout")
    args = parser.parse_args(argv)

    findings = demo_findings()
    asked = list(findings.values())
    app = SlicerApplication(view_size=(args.view_size, args.view_size))
    import slicer

    import SlicerHLIP
    from SlicerHLIPLib import MemorySettings

    def wait(task):
        task.start()
        while not task.done:
            time.sleep(0.01)
        return task.result()

    with tempfile.TemporaryDirectory() as tmp, monailabel_server(str(args.studies.resolve()), args.checkpoint.resolve(), Path(tmp),
                                                                 {"cache_dir": Path(tmp) / "cache"}) as (url, _):
        logic = SlicerHLIP.SlicerHLIPLogic(MemorySettings())
        wait(logic.connectTask(url))
        chosen = None
        for study_id, planted in candidates(args.studies, args.tries):
            app.clear()
            nodes = [logic.loadVolumeFile(p, p.name.split(".")[0]) for p in sorted((args.studies / study_id).glob("*.nii*"))]
            started = time.perf_counter()
            answer = wait(logic.startQuestion([n.GetID() for n in nodes], asked, heatmaps=True, regionName="Brain MRI"))
            logic.showAnswer(answer, probabilityThreshold=0.5)
            row = asked.index(findings[planted])
            logic.showHeatmap(row, opacity=0.55, threshold=0.35)
            seconds = time.perf_counter() - started
            probability = answer.result.rows[row].probability
            print(f"{study_id}: {len(nodes)} scans, planted {planted!r}: p={probability:.3f}; round trip {seconds:.2f} s "
                  f"(server {answer.result.server_ms or 0:.0f} ms)")
            if probability >= 0.5:
                chosen = (study_id, planted, row)
                break
        if chosen is None:
            print("no candidate study had its planted finding flagged; not writing screenshots", file=sys.stderr)
            return 1
        study_id, planted, row = chosen
        if args.round_trips:
            seconds = []
            nodes = [v.key for v in logic.sceneVolumes()]
            for _ in range(args.round_trips):
                started = time.perf_counter()
                logic.showAnswer(wait(logic.startQuestion(nodes, asked, heatmaps=True, regionName="Brain MRI")), 0.5)
                logic.showHeatmap(row, opacity=0.55, threshold=0.35)
                seconds.append(time.perf_counter() - started)
            seconds.sort()
            print(f"round trip of {study_id} ({len(nodes)} scans, {len(asked)} findings with heat maps), {len(seconds)} times: "
                  f"median {seconds[len(seconds) // 2]:.2f} s, min {seconds[0]:.2f} s, max {seconds[-1]:.2f} s")
        heat = slicer.mrmlScene.GetNodeByID(logic.heatmapNodeID)
        values = slicer.util.arrayFromVolume(heat)
        import numpy as np

        k, j, i = np.unravel_index(np.argmax(values), values.shape)  # every view through the map's strongest voxel
        import vtk

        matrix = vtk.vtkMatrix4x4()
        heat.GetIJKToRASMatrix(matrix)
        ras = matrix.MultiplyPoint((float(i), float(j), float(k), 1.0))[:3]
        app.fit_slices()
        for name, logic_ in app.slice_logics.items():
            logic_.GetSliceNode().JumpSliceByOffsetting(*ras)
            logic_.GetSliceNode().SetSliceVisible(True)
        args.out.mkdir(parents=True, exist_ok=True)
        write_png(app.render_four_up(), args.out / "SlicerHLIP-four-up.png")
        flagged = {r for r, item in enumerate(logic.tableRows) if item["Flag"]}
        render_table(logic.findingsTableNode(), flagged, args.out / "SlicerHLIP-findings.png")
        print(f"wrote {args.out / 'SlicerHLIP-four-up.png'} and {args.out / 'SlicerHLIP-findings.png'}: held-out study {study_id}, "
              f"heat map of {findings[planted]!r}")
        if args.dicom_series:  # a real DICOM series read by Slicer's archetype reader, uploaded and asked
            app.clear()
            first = sorted(p for p in args.dicom_series.iterdir() if p.is_file())[0]
            series = slicer.modules.volumes.logic().AddArchetypeVolume(str(first), "DICOM series", 0)
            seconds = []
            for _ in range(max(1, args.round_trips)):
                started = time.perf_counter()
                answer = wait(logic.startQuestion([series.GetID()], asked, heatmaps=True, regionName="Brain MRI"))
                logic.showAnswer(answer, 0.5)
                logic.showHeatmap(0, opacity=0.55, threshold=0.35)
                seconds.append(time.perf_counter() - started)
            seconds.sort()
            print(f"round trip of the DICOM series ({'x'.join(map(str, series.GetImageData().GetDimensions()))} voxels, "
                  f"{len(asked)} findings with heat maps), {len(seconds)} times: median {seconds[len(seconds) // 2]:.2f} s, "
                  f"min {seconds[0]:.2f} s, max {seconds[-1]:.2f} s (server {answer.result.server_ms or 0:.0f} ms in the last)")
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
