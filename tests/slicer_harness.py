"""What 3D Slicer's application builds around a scripted module, from Slicer's own core libraries
(the ``slicer-core`` wheel, requirements-slicer.txt), for the SlicerHLIP tests and screenshots.

``SlicerApplication()`` makes, in the order qSlicerCoreApplication uses:

- a real ``vtkMRMLScene`` (assigned to ``slicer.mrmlScene``) with the default crosshair node;
- a real ``vtkSlicerApplicationLogic`` with the real module logics registered by name: Colors
  (``vtkSlicerColorLogic``, also the application's colour logic), Volumes, Tables, Subject
  Hierarchy, Volume Rendering;
- three real ``vtkMRMLSliceLogic`` (Red axial, Yellow sagittal, Green coronal) with their slice
  and slice composite nodes, and a 3D view node;
- offscreen rendering of those views with Slicer's own displayable managers (``render_*``).

Every node, logic, reader and writer the module touches is Slicer's real one. Stand-ins exist only
for what slicer-core does not have (it is Slicer's C++ libraries without the Qt application):

- ``qt``: a module with ``Qt.UserRole`` (the one ``qt`` name SlicerHLIP.py reads at import, for
  its table view's sort role). The widget (Qt widgets, timers, QSettings) is not built here, so
  SlicerHLIPWidget is not exercised by these tests.
- ``slicer.ScriptedLoadableModule``: the four base classes, which in Slicer are Python code of the
  application (``ScriptedLoadableModuleTest`` is a ``unittest.TestCase`` whose ``delayDisplay``
  logs; the logic base class holds nothing the module uses).
- ``slicer.app``: ``processEvents`` (there is no Qt event loop) and ``layoutManager`` with
  ``sliceViewNames``, ``sliceWidget(name).mrmlSliceNode / mrmlSliceCompositeNode / sliceLogic``
  and ``mrmlSliceLogics``, answered by the real slice logics above.
- ``slicer.modules``: ``<name>.logic()`` for the registered real module logics.
- ``slicer.dicomDatabase = None`` (no DICOM database: volumes here come from files).
"""
from __future__ import annotations

import logging
import sys
import tempfile
import types
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLICER_MODULE = REPO / "SlicerHLIP"

SLICE_VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


def _install_stand_ins() -> None:
    """The ``qt`` and ``slicer.ScriptedLoadableModule`` stand-ins (see the module docstring)."""
    import slicer

    if "qt" not in sys.modules:
        qt = types.ModuleType("qt")
        qt.__doc__ = "Stand-in: only Qt.UserRole (tests/slicer_harness.py)."
        qt.Qt = types.SimpleNamespace(UserRole=0x0100)
        sys.modules["qt"] = qt
    if "slicer.ScriptedLoadableModule" not in sys.modules:
        slm = types.ModuleType("slicer.ScriptedLoadableModule")

        class ScriptedLoadableModule:
            def __init__(self, parent):
                self.parent = parent

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None):
                self.parent = parent

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None):
                self.parent = parent

        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, msec=None):
                logging.info("%s", message)

        for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
            setattr(slm, cls.__name__, cls)
        sys.modules["slicer.ScriptedLoadableModule"] = slm
        slicer.ScriptedLoadableModule = slm
    if str(SLICER_MODULE) not in sys.path:  # as Slicer does: the module's folder is on the path
        sys.path.insert(0, str(SLICER_MODULE))


def _load_triton_first() -> None:
    """Load torch's Triton (when installed) before the first offscreen render window: once Mesa's
    llvmpipe (the EGL renderer of this machine kind) has loaded its LLVM, loading libtriton's own
    LLVM into the same process crashes it (seen with triton 3.x, torch 2.14, vtk 9.6). In this
    order both work, so later tests of the suite that import torch._dynamo run unharmed."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


class _SliceWidget:
    def __init__(self, logic):
        self._logic = logic

    def sliceLogic(self):
        return self._logic

    def mrmlSliceNode(self):
        return self._logic.GetSliceNode()

    def mrmlSliceCompositeNode(self):
        return self._logic.GetSliceCompositeNode()


class _LayoutManager:
    def __init__(self, app):
        self._app = app

    def sliceViewNames(self):
        return [name for name, _ in SLICE_VIEWS]

    def sliceWidget(self, name):
        return _SliceWidget(self._app.slice_logics[name])

    def mrmlSliceLogics(self):
        return self._app.app_logic.GetSliceLogics()


class _App:
    """Stand-in for ``slicer.app``: the calls the module makes (see the module docstring)."""

    def __init__(self, harness):
        self._layout = _LayoutManager(harness)

    def processEvents(self):
        pass

    def layoutManager(self):
        return self._layout


class SlicerApplication:
    """Slicer's scene, application logic, module logics and slice views (see the module docstring).
    ``view_size``: the slice views' size in pixels (width, height)."""

    def __init__(self, view_size=(384, 384)):
        _load_triton_first()
        import slicer
        import vtk

        _install_stand_ins()
        self.view_size = tuple(view_size)
        scene = slicer.vtkMRMLScene()
        self._temporary = tempfile.TemporaryDirectory(prefix="slicer-harness-")
        cache = slicer.vtkCacheManager()  # the scene's data I/O manager and cache, as the application sets them
        cache.SetRemoteCacheDirectory(self._temporary.name)
        io_manager = slicer.vtkDataIOManager()
        io_manager.SetCacheManager(cache)
        scene.SetCacheManager(cache)
        scene.SetDataIOManager(io_manager)
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetSingletonTag("default")
        scene.AddNode(crosshair)
        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetMRMLScene(scene)
        app_logic.SetTemporaryPath(self._temporary.name)
        app_logic.SetSliceLogics(vtk.vtkCollection())
        app_logic.SetViewLogics(vtk.vtkCollection())
        self.scene, self.app_logic = scene, app_logic
        self.logics = {}
        for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                          ("Tables", slicer.vtkSlicerTablesLogic), ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                          ("VolumeRendering", slicer.vtkSlicerVolumeRenderingLogic)):
            logic = cls()
            logic.SetMRMLApplicationLogic(app_logic)  # before the scene: the colour logic asks for it
            logic.SetMRMLScene(scene)
            app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        app_logic.SetColorLogic(self.logics["Colors"])
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
        slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
        slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
        self.slice_logics = {}
        for name, orientation in SLICE_VIEWS:
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(app_logic)
            app_logic.GetSliceLogics().AddItem(logic)
            logic.SetMRMLScene(scene)
            node = logic.AddSliceNode(name)
            node.SetOrientation(orientation)
            node.SetLayoutColor(*{"Red": (0.95, 0.35, 0.35), "Yellow": (0.93, 0.84, 0.3), "Green": (0.43, 0.69, 0.3)}[name])
            logic.ResizeSliceNode(*self.view_size)
            self.slice_logics[name] = logic
        view = scene.AddNewNodeByClass("vtkMRMLViewNode")
        view.SetName("View1")
        view.SetLayoutName("1")
        self.view_node = view
        self._build_views()

        slicer.mrmlScene = scene
        slicer.app = _App(self)
        slicer.modules = types.SimpleNamespace(**{
            key: types.SimpleNamespace(logic=(lambda logic=self.logics[name]: logic))
            for key, name in (("colors", "Colors"), ("volumes", "Volumes"), ("tables", "Tables"),
                              ("subjecthierarchy", "SubjectHierarchy"), ("volumerendering", "VolumeRendering"))})
        slicer.dicomDatabase = None

    def fit_slices(self):
        """Fit each slice view to its background volume, as Slicer does when a volume is shown."""
        for logic in self.slice_logics.values():
            logic.ResizeSliceNode(*self.view_size)
            logic.FitSliceToBackground()
            logic.SnapSliceOffsetToIJK()

    def clear(self):
        """File > Close Scene: the scene is cleared (singletons such as the slice nodes stay)."""
        self.scene.Clear(False)

    def close(self):
        import slicer

        for window, _, group in self.views.values():
            group.SetMRMLDisplayableNode(None)
            window.Finalize()

        for logic in self.slice_logics.values():
            logic.SetMRMLScene(None)
        for logic in self.logics.values():
            logic.SetMRMLScene(None)
        self.app_logic.SetMRMLScene(None)
        slicer.mrmlScene = None
        self._temporary.cleanup()

    # -- offscreen views ---------------------------------------------------------------------------

    SLICE_MANAGERS = ("vtkMRMLColorLegendDisplayableManager",)
    THREE_D_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager", "vtkMRMLModelDisplayableManager",
                        "vtkMRMLVolumeRenderingDisplayableManager", "vtkMRMLColorLegendDisplayableManager")

    def _window(self, size):
        import vtk

        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.SetSize(*size)
        renderer = vtk.vtkRenderer()
        window.AddRenderer(renderer)
        interactor = vtk.vtkRenderWindowInteractor()  # the displayable managers observe one; it never starts
        interactor.SetRenderWindow(window)
        window.hlip_interactor = interactor
        return window, renderer

    @staticmethod
    def _pixels(window):
        """The window's pixels as a (height, width, 3) uint8 array, top row first."""
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        width, height, _ = grab.GetOutput().GetDimensions()
        return vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars()).reshape(height, width, 3)[::-1].copy()

    def _build_views(self):
        """Slicer's views, made once like the application's (before any data is loaded, so their
        displayable managers see every node as it comes): per slice view a renderer fed by the
        slice logic's blended image drawn 1:1, as qMRMLSliceView does, plus the slice displayable
        managers; one 3D view with the 3D displayable managers."""
        import slicer
        import vtk

        self.views = {}
        slice_factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for manager in self.SLICE_MANAGERS:
            if not slice_factory.IsDisplayableManagerRegistered(manager):
                slice_factory.RegisterDisplayableManager(manager)
        for name, logic in self.slice_logics.items():
            window, renderer = self._window(self.view_size)
            mapper = vtk.vtkImageMapper()
            mapper.SetInputConnection(logic.GetImageDataConnection())
            mapper.SetColorWindow(255)
            mapper.SetColorLevel(127.5)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            renderer.AddViewProp(actor)
            group = slice_factory.InstantiateDisplayableManagers(renderer)
            group.SetMRMLDisplayableNode(logic.GetSliceNode())
            window.hlip_mapper = mapper
            self.views[name] = (window, renderer, group)
        three_d_factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        for manager in self.THREE_D_MANAGERS:
            if not three_d_factory.IsDisplayableManagerRegistered(manager):
                three_d_factory.RegisterDisplayableManager(manager)
        window, renderer = self._window(self.view_size)
        group = three_d_factory.InstantiateDisplayableManagers(renderer)
        group.SetMRMLDisplayableNode(self.view_node)
        self.views["3D"] = (window, renderer, group)

    def render_slice_view(self, name):
        """Slice view ``name`` (Red, Yellow, Green) as Slicer's slice view draws it: the slice
        logic's blended layers (background, foreground at its opacity, label) and the slice
        displayable managers (colour legend) on top. Returns (height, width, 3) uint8."""
        window, _, group = self.views[name]
        window.hlip_mapper.SetInputConnection(self.slice_logics[name].GetImageDataConnection())  # as qMRMLSliceWidget does on a change
        window.Render()
        return self._pixels(window)

    def render_three_d_view(self):
        """The 3D view as Slicer draws it (its displayable managers: camera, the slice planes as
        models, volume rendering, colour legend), from the front-left above. Returns
        (height, width, 3) uint8."""
        window, renderer, _ = self.views["3D"]
        renderer.ResetCamera()
        camera = renderer.GetActiveCamera()
        camera.Elevation(20)
        camera.Azimuth(30)
        camera.Zoom(1.3)
        renderer.ResetCameraClippingRange()
        window.Render()
        return self._pixels(window)

    def render_four_up(self, border=2):
        """Slicer's Four-Up layout: Red | 3D over Yellow | Green, each view ``view_size``, with a
        thin border of the view's layout colour. Returns (height, width, 3) uint8."""
        import numpy as np

        views = {name: self.render_slice_view(name) for name, _ in SLICE_VIEWS}
        views["3D"] = self.render_three_d_view()
        colours = {"Red": (242, 89, 89), "Yellow": (237, 214, 77), "Green": (110, 176, 77), "3D": (116, 116, 220)}
        for name, pixels in views.items():
            pixels[:border], pixels[-border:], pixels[:, :border], pixels[:, -border:] = (colours[name],) * 4
        return np.vstack([np.hstack([views["Red"], views["3D"]]), np.hstack([views["Yellow"], views["Green"]])])


def write_png(pixels, path) -> None:
    """Write a (height, width, 3) uint8 array (top row first) as a PNG with VTK's writer."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    height, width, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    image.GetPointData().SetScalars(numpy_to_vtk(pixels[::-1].reshape(-1, 3).copy(), deep=True))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
