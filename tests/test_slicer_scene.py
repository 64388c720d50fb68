"""SlicerHLIP's logic on Slicer's real MRML scene (tests/slicer_harness.py: Slicer's scene,
application logic, module logics and slice views from the slicer-core wheel), against a real
``monailabel start_server`` with a tiny checkpoint: the module's own self-test, a real DICOM
series and a NIfTI scan loaded by Slicer's Volumes logic asked and answered (table, heat-map
geometry against the scans' nodes, slice layers), swapping findings, failures that leave the scene
as it was, the parameter node through a .mrb, and Slicer-rendered views (pixel facts)."""
import time
from pathlib import Path

import numpy as np
import pytest

from realdata import real_mri_dicom_dir
from released_factory import write_released_folder
from server_helpers import make_checkpoint, monailabel_server, require_ingestion, write_nifti_study
from slicer_helpers import silent_server, unused_port_url

from slicer_harness import SlicerApplication  # noqa: E402

FINDINGS = ["mass effect", "midline shift", "hydrocephalus"]


@pytest.fixture(scope="module")
def app():
    harness = SlicerApplication(view_size=(256, 256))
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_ingestion()
    tmp = tmp_path_factory.mktemp("slicer-scene")
    write_nifti_study(tmp / "studies" / "studyA", n_scans=2, seed=31)
    conf = {"cache_dir": tmp / "cache", "threads": 1, "rescan_seconds": 1}
    with monailabel_server(str(tmp / "studies"), make_checkpoint(tmp / "ckpt"), tmp / "run", conf) as (base, _):
        yield base


@pytest.fixture
def scene(app):
    app.clear()
    yield app.scene
    app.clear()


def wait(task, seconds=300):
    task.start()
    deadline = time.monotonic() + seconds
    while not task.done:
        assert time.monotonic() < deadline, f"{task.name} took longer than {seconds} s"
        time.sleep(0.02)
    return task.result()


def ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def assert_on_grid_of(node, scan):
    """Dimensions, spacing and IJK-to-RAS of ``node`` are those of the scan's node (1e-4 mm)."""
    assert node.GetImageData().GetDimensions() == scan.GetImageData().GetDimensions()
    assert np.allclose(node.GetSpacing(), scan.GetSpacing(), atol=1e-4)
    assert np.allclose(ijk_to_ras(node), ijk_to_ras(scan), atol=1e-4), (ijk_to_ras(node), ijk_to_ras(scan))


def load_real_study(app, folder: Path):
    """The real DICOM series (Slicer's archetype reader reads the whole series from one file) and a
    NIfTI scan on another grid (every 2nd voxel in-plane, made with SimpleITK), both read into the
    scene by Slicer's Volumes logic."""
    import SimpleITK as sitk

    logic = app.logics["Volumes"]
    dicom_files = sorted(real_mri_dicom_dir().iterdir())
    t1 = logic.AddArchetypeVolume(str(dicom_files[0]), "T1w DICOM", 0)
    assert t1 is not None and t1.GetImageData().GetDimensions()[2] == len(dicom_files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in dicom_files])
    coarse = reader.Execute()[::2, ::2, :]
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(coarse, str(folder / "t1-coarse.nii.gz"))
    second = logic.AddArchetypeVolume(str(folder / "t1-coarse.nii.gz"), "T1w coarse NIfTI", 4)
    assert second is not None
    return t1, second


def new_logic(url=None):
    import SlicerHLIP
    from SlicerHLIPLib import MemorySettings

    logic = SlicerHLIP.SlicerHLIPLogic(MemorySettings())
    if url:
        wait(logic.connectTask(url))
    return logic


def scene_state(scene):
    """What a failure must not change: every node's id, name and modification time, and the layers
    of the slice composite nodes."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    layers = [(c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
              for c in (scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3))]
    return sorted((n.GetID(), n.GetName(), n.GetMTime()) for n in nodes), layers


# -- the module's own test -------------------------------------------------------------------------------


def test_the_modules_self_test_passes_with_a_real_server(app, server, monkeypatch):
    import SlicerHLIP

    monkeypatch.setenv("HLIP_SERVER_URL", server)
    test = SlicerHLIP.SlicerHLIPTest()
    test.runTest()  # raises on the first failed assertion, as ctest would report it


# -- a real study, there and back --------------------------------------------------------------------------


def test_a_real_study_goes_to_the_server_and_back_onto_its_scans(app, server, scene, tmp_path):
    import SlicerHLIP
    from SlicerHLIPLib import TABLE_COLUMNS

    t1, coarse = load_real_study(app, tmp_path)
    logic = new_logic(server)
    answer = wait(logic.startQuestion([t1.GetID(), coarse.GetID()], FINDINGS, heatmaps=True))
    table = logic.showAnswer(answer, probabilityThreshold=0.0)
    # the findings table node: one row per finding, the module's columns, numbers in the numeric ones
    assert table.GetNumberOfRows() == len(FINDINGS)
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [name for name, _ in TABLE_COLUMNS]
    vtable = table.GetTable()
    for c, (name, kind) in enumerate(TABLE_COLUMNS):
        assert vtable.GetColumn(c).GetClassName() == ("vtkDoubleArray" if kind == "double" else "vtkStringArray"), name
    assert [table.GetCellText(r, 0) for r in range(len(FINDINGS))] == FINDINGS
    probability = [c for c, (name, _) in enumerate(TABLE_COLUMNS) if name == "Probability"][0]
    assert all(0.0 <= vtable.GetValue(r, probability).ToDouble() <= 1.0 for r in range(len(FINDINGS)))
    assert {table.GetCellText(r, 3) for r in range(len(FINDINGS))} <= {t1.GetName(), coarse.GetName()}
    # each heat map: on the grid of its scan's node, shown over it in the three slice views
    composites = [app.slice_logics[name].GetSliceCompositeNode() for name in ("Red", "Yellow", "Green")]
    shown = set()
    for row, opacity, threshold in ((0, 0.35, 0.25), (1, 0.6, 0.1), (2, 0.5, 0.4)):
        scan = logic.scanNodeOf(row)
        assert scan.GetID() in (t1.GetID(), coarse.GetID())
        assert table.GetCellText(row, 3) == scan.GetName()
        heat = logic.showHeatmap(row, opacity=opacity, threshold=threshold)
        shown.add(heat.GetID())
        assert_on_grid_of(heat, scan)
        values = SlicerHLIP.slicer.util.arrayFromVolume(heat)
        assert np.isfinite(values).all() and values.min() >= 0 and 0 < values.max() <= 1.0001
        for composite in composites:
            assert composite.GetBackgroundVolumeID() == scan.GetID() and composite.GetForegroundVolumeID() == heat.GetID()
            assert composite.GetForegroundOpacity() == pytest.approx(opacity)
        display = heat.GetDisplayNode()
        assert display.GetColorNodeID() == "vtkMRMLColorTableNodeWarm1"  # Inferno is not in slicer-core
        assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(threshold)
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
        # another finding swaps the overlay: the same node, no pile-up
        assert len(shown) == 1
        assert len([n for n in SlicerHLIP.slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                    if n.GetAttribute(SlicerHLIP.HEATMAP_ATTRIBUTE)]) == 1
        assert heat.GetAttribute(SlicerHLIP.HEATMAP_ATTRIBUTE) == FINDINGS[row]
    # the heat-map node is not offered as a volume to ask
    assert [v.key for v in logic.sceneVolumes()] == [t1.GetID(), coarse.GetID()]


@pytest.fixture(scope="module")
def released_server(tmp_path_factory):
    """The server with a released Hugging Face folder (a tiny dual dino.txt model) as its checkpoint."""
    require_ingestion()
    tmp = tmp_path_factory.mktemp("slicer-released")
    write_nifti_study(tmp / "studies" / "studyR", n_scans=1, seed=32)
    folder = tmp / "hlip-released"
    write_released_folder(folder, "tiny_multiscan_h2_dualdinotxt")
    conf = {"cache_dir": tmp / "cache", "threads": 1, "rescan_seconds": 1}
    with monailabel_server(str(tmp / "studies"), folder, tmp / "run", conf) as (base, _):
        yield base


def test_a_real_study_round_trips_with_a_released_folder_as_the_servers_checkpoint(app, released_server, scene, tmp_path):
    """The same round trip with the weights users download: the table is filled and every heat map
    lies on its scan's grid (the released preset pads and crops; the map is mapped back)."""
    import SlicerHLIP

    t1, coarse = load_real_study(app, tmp_path)
    logic = new_logic(released_server)
    answer = wait(logic.startQuestion([t1.GetID(), coarse.GetID()], FINDINGS, heatmaps=True))
    table = logic.showAnswer(answer, probabilityThreshold=0.0)
    assert [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())] == FINDINGS
    for row in range(len(FINDINGS)):
        scan = logic.scanNodeOf(row)
        heat = logic.showHeatmap(row, opacity=0.5, threshold=0.1)
        assert_on_grid_of(heat, scan)
        values = SlicerHLIP.slicer.util.arrayFromVolume(heat)
        assert np.isfinite(values).all() and values.min() >= 0 and 0 < values.max() <= 1.0001


def test_failures_leave_the_scene_as_it_was_and_say_what_happened(app, server, scene, tmp_path):
    from SlicerHLIPLib import HLIPClient, NotFound, RequestTimeout, ServerUnreachable

    t1, coarse = load_real_study(app, tmp_path)
    logic = new_logic(server)
    logic.showAnswer(wait(logic.startQuestion([t1.GetID()], FINDINGS[:1])))  # an earlier answer on show
    logic.showHeatmap(0, opacity=0.3, threshold=0.2)
    table = logic.findingsTableNode()
    cells = [table.GetCellText(0, c) for c in range(table.GetNumberOfColumns())]

    coarse.SetAttribute("HLIP.serverStudy", "no-such-study")  # asked by an id the server does not know: a 404
    coarse.SetAttribute("HLIP.serverImage", "no-such-image")
    coarse.SetAttribute("HLIP.serverStudyImages", "no-such-image")
    before = scene_state(scene)
    with pytest.raises(NotFound, match="Not found on the server: no study or image with this id in the datastore"):
        wait(logic.startQuestion([coarse.GetID()], FINDINGS[:1]))
    assert scene_state(scene) == before

    logic.client = HLIPClient(unused_port_url(), connect_timeout=2)  # the server went away
    with pytest.raises(ServerUnreachable, match="Server not reachable at .*; is it running"):
        wait(logic.startQuestion([t1.GetID()], FINDINGS[:1]))
    assert scene_state(scene) == before

    with silent_server() as url:  # a server that never answers
        logic.client = HLIPClient(url, timeout=1, infer_timeout=1, connect_timeout=1)
        with pytest.raises(RequestTimeout, match=r"did not answer .* within 1 s"):
            wait(logic.startQuestion([t1.GetID()], FINDINGS[:1]))
    assert scene_state(scene) == before
    assert [table.GetCellText(0, c) for c in range(table.GetNumberOfColumns())] == cells


# -- the panel's state in the scene -------------------------------------------------------------------------


def test_the_panel_state_is_restored_from_a_saved_mrb(app, server, scene, tmp_path):
    import SlicerHLIP

    t1, coarse = load_real_study(app, tmp_path / "data")
    logic = new_logic(server)
    logic.setParameter("ServerURL", server)
    logic.setParameter("FindingsText", "\n".join(FINDINGS))
    logic.showAnswer(wait(logic.startQuestion([t1.GetID(), coarse.GetID()], FINDINGS)))
    heat = logic.showHeatmap(1, opacity=0.45, threshold=0.3)
    scan = logic.scanNodeOf(1)
    table = logic.findingsTableNode()
    rows = [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())] for r in range(table.GetNumberOfRows())]
    expected = {"ServerURL": server, "FindingsText": "\n".join(FINDINGS), "SelectedFinding": FINDINGS[1],
                "HeatmapOpacity": 0.45, "HeatmapThreshold": 0.3}
    assert {name: logic.parameter(name) for name in SlicerHLIP.PARAMETERS} == expected
    heat_grid, heat_values = ijk_to_ras(heat), SlicerHLIP.slicer.util.arrayFromVolume(heat).copy()

    bundle = tmp_path / "scene.mrb"
    assert scene.WriteToMRB(str(bundle)) and bundle.stat().st_size > 0
    app.clear()
    assert scene.GetFirstNodeByClass("vtkMRMLTableNode") is None and scene.GetFirstNodeByName(scan.GetName()) is None
    cleared = scene.GetSingletonNode("SlicerHLIP", "vtkMRMLScriptedModuleNode")  # a singleton: kept, but reset
    assert cleared is None or not cleared.GetParameterNames()
    assert scene.ReadFromMRB(str(bundle))

    restored = new_logic()
    restored.restoreFromScene()
    assert {name: restored.parameter(name) for name in SlicerHLIP.PARAMETERS} == expected
    table = restored.findingsTableNode()
    assert [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())] for r in range(table.GetNumberOfRows())] == rows
    heat = scene.GetNodeByID(restored.heatmapNodeID)
    assert heat.GetAttribute(SlicerHLIP.HEATMAP_ATTRIBUTE) == FINDINGS[1]
    assert np.allclose(ijk_to_ras(heat), heat_grid, atol=1e-4)
    assert np.allclose(SlicerHLIP.slicer.util.arrayFromVolume(heat), heat_values, atol=1e-6)
    scan_again = scene.GetFirstNodeByName(scan.GetName())
    assert_on_grid_of(heat, scan_again)
    # the saved finding's map is shown again from the scene; the others need a new answer
    assert restored.showHeatmap(1, opacity=0.45, threshold=0.3) is heat
    assert restored.showHeatmap(0) is None and restored.parameter("SelectedFinding") == FINDINGS[0]
    composite = app.slice_logics["Red"].GetSliceCompositeNode()  # the slice views' layers came back with the scene
    assert composite.GetForegroundVolumeID() == heat.GetID() and composite.GetBackgroundVolumeID() == scan_again.GetID()


# -- what the views show -----------------------------------------------------------------------------------


def foreground_values(app, view):
    """The heat map's values resampled by the slice logic onto the view's pixels (its foreground
    layer's reslice, before colouring), as a (height, width) array, top row first."""
    from vtk.util.numpy_support import vtk_to_numpy

    reslice = app.slice_logics[view].GetForegroundLayer().GetReslice()
    reslice.Update()
    width, height, _ = reslice.GetOutput().GetDimensions()
    return vtk_to_numpy(reslice.GetOutput().GetPointData().GetScalars()).reshape(height, width)[::-1]


def test_the_views_show_the_heat_map_inside_its_region_only_and_a_colour_legend(app, server, scene, tmp_path):
    import SlicerHLIP

    t1, _ = load_real_study(app, tmp_path)
    logic = new_logic(server)
    logic.showAnswer(wait(logic.startQuestion([t1.GetID()], FINDINGS[:1])))
    threshold, opacity = 0.5, 0.6
    heat = logic.showHeatmap(0, opacity=opacity, threshold=threshold)
    app.fit_slices()
    values = SlicerHLIP.slicer.util.arrayFromVolume(heat)
    k, j, i = np.unravel_index(np.argmax(values), values.shape)  # the Red view through the map's strongest voxel
    app.slice_logics["Red"].SetSliceOffset((ijk_to_ras(heat) @ np.array([i, j, k, 1.0]))[2])
    shown = app.render_slice_view("Red")
    legend_node = SlicerHLIP.slicer.modules.colors.logic().GetColorLegendDisplayNode(heat)
    assert legend_node is not None and legend_node.GetTitleText() == "Heat map"
    legend_node.SetVisibility(False)
    no_legend = app.render_slice_view("Red")
    composite = app.slice_logics["Red"].GetSliceCompositeNode()
    composite.SetForegroundOpacity(0.0)
    background_only = app.render_slice_view("Red")
    composite.SetForegroundOpacity(opacity)
    legend_node.SetVisibility(True)

    def differs(a, b):
        return np.abs(a.astype(int) - b.astype(int)).sum(axis=2) > 0

    legend = differs(shown, no_legend)
    assert legend.sum() > 200  # the colour legend is drawn (bar, labels, title)
    assert (shown[legend][:, 0].astype(int) > shown[legend][:, 2].astype(int) + 60).sum() > 50  # in the map's warm colours
    inside = foreground_values(app, "Red") >= threshold
    assert inside.shape == legend.shape and inside.sum() > 20 and (~inside).sum() > 20
    overlay = differs(no_legend, background_only)
    warm = no_legend[..., 0].astype(int) > no_legend[..., 2].astype(int) + 30
    assert overlay[inside].mean() > 0.95 and warm[inside].mean() > 0.9  # the overlay colour inside the map's region
    assert not overlay[~inside].any()  # and none outside it


def test_the_heat_map_in_3d_is_slicers_volume_rendering_of_it(app, server, scene, tmp_path):
    import SlicerHLIP

    t1, _ = load_real_study(app, tmp_path)
    logic = new_logic(server)
    logic.showAnswer(wait(logic.startQuestion([t1.GetID()], FINDINGS[:1])))
    logic.showHeatmap(0, opacity=0.5, threshold=0.3, volumeRendering=False)
    before = app.render_three_d_view()  # the slice views' layers and the legend, no volume rendering yet
    heat = logic.showHeatmap(0, opacity=0.5, threshold=0.3, volumeRendering=True)
    vr = SlicerHLIP.slicer.modules.volumerendering.logic().GetFirstVolumeRenderingDisplayNode(heat)
    assert vr is not None and vr.GetVisibility()
    shown = app.render_three_d_view()
    changed = np.abs(shown.astype(int) - before.astype(int)).sum(axis=2) > 30
    assert changed.sum() > 100  # the rendering is drawn in the 3D view
    assert (shown[changed][:, 0].astype(int) > shown[changed][:, 2].astype(int)).mean() > 0.5  # in warm colours
    logic.showHeatmap(0, opacity=0.5, threshold=0.3, volumeRendering=False)
    assert not vr.GetVisibility()
