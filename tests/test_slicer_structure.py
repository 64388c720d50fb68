"""The 3D Slicer extension's structure, checked without Slicer: what CMake lists exists and every
module file is listed; the panel's .ui is valid Qt Designer XML that defines every widget the
module uses; the module compiles; the plain-Python layer imports without slicer, qt, vtk (or
numpy); the icon is a 128x128 PNG; the extension metadata is complete."""
import ast
import json
import py_compile
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from slicer_helpers import REPO, SLICER_MODULE, cmake_calls, cmake_set_values

MODULE_FILE = SLICER_MODULE / "SlicerHLIP.py"
UI_FILE = SLICER_MODULE / "Resources" / "UI" / "SlicerHLIP.ui"
ICON = SLICER_MODULE / "Resources" / "Icons" / "SlicerHLIP.png"
# Qt's own widget classes may be used in the .ui without a <customwidget> declaration
QT_CLASSES = {"QWidget", "QFrame", "QLabel", "QPushButton", "QComboBox", "QLineEdit", "QPlainTextEdit", "QCheckBox",
              "QProgressBar", "QListWidget", "QTableWidget", "QSpinBox", "QDoubleSpinBox", "QTableView", "QGroupBox",
              "QTextEdit", "QToolButton", "QRadioButton", "QTabWidget", "QSplitter", "QScrollArea"}
QT_LAYOUTS = {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"}


# -- CMake -------------------------------------------------------------------------------------------


def module_lists():
    text = (SLICER_MODULE / "CMakeLists.txt").read_text()
    values = cmake_set_values(text)
    name = values["MODULE_NAME"][0]
    expand = lambda items: [i.replace("${MODULE_NAME}", name) for i in items]  # noqa: E731
    return name, expand(values["MODULE_PYTHON_SCRIPTS"]), expand(values["MODULE_PYTHON_RESOURCES"]), text


def test_every_file_the_module_cmakelists_lists_exists():
    name, scripts, resources, _ = module_lists()
    assert name == "SlicerHLIP"
    missing = [p for p in scripts + resources if not (SLICER_MODULE / p).is_file()]
    assert not missing, f"listed in SlicerHLIP/CMakeLists.txt but missing: {missing}"
    assert len(set(scripts)) == len(scripts) and len(set(resources)) == len(resources)


def test_every_module_file_is_listed_in_the_module_cmakelists():
    _, scripts, resources, _ = module_lists()
    python = {p.relative_to(SLICER_MODULE).as_posix() for p in SLICER_MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert python - set(scripts) == set(), "Python files of the module not in MODULE_PYTHON_SCRIPTS"
    on_disk = {p.relative_to(SLICER_MODULE).as_posix() for p in (SLICER_MODULE / "Resources").rglob("*") if p.is_file()}
    assert on_disk - set(resources) == set(), "resource files not in MODULE_PYTHON_RESOURCES"
    unexpected = {p.relative_to(SLICER_MODULE).as_posix() for p in SLICER_MODULE.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".txt")
                  and not p.relative_to(SLICER_MODULE).as_posix().startswith("Resources/")}
    assert not unexpected, f"files in SlicerHLIP/ that the build does not install: {unexpected}"


def test_the_module_is_built_as_a_scripted_module_with_its_self_test():
    _, _, _, text = module_lists()
    calls = cmake_calls(text)
    build = [args for name, args in calls if name == "slicerMacroBuildScriptedModule"]
    assert len(build) == 1
    args = build[0].split()
    assert args[args.index("NAME") + 1] == "${MODULE_NAME}"
    assert args[args.index("SCRIPTS") + 1] == "${MODULE_PYTHON_SCRIPTS}"
    assert args[args.index("RESOURCES") + 1] == "${MODULE_PYTHON_RESOURCES}"
    assert ("slicer_add_python_unittest", "SCRIPT ${MODULE_NAME}.py") in calls
    for sub in [args.strip() for name, args in calls if name == "add_subdirectory"]:
        assert (SLICER_MODULE / sub / "CMakeLists.txt").is_file(), sub


def test_the_extension_cmakelists_has_every_metadata_variable():
    text = (REPO / "CMakeLists.txt").read_text()
    values = {k: " ".join(v) for k, v in cmake_set_values(text).items()}
    calls = cmake_calls(text)
    assert ("project", "SlicerHLIP") in calls
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert values.get(key, "").strip(), f"{key} is not set"
    assert ("find_package", "Slicer REQUIRED") in calls
    assert ("include", "${Slicer_USE_FILE}") in calls
    assert ("add_subdirectory", "SlicerHLIP") in calls
    assert calls[-2:] == [("include", "${Slicer_EXTENSION_GENERATE_CONFIG}"), ("include", "${Slicer_EXTENSION_CPACK}")]
    # the repository URL is defined once; homepage, icon and screenshots derive from it
    repository = values["SlicerHLIP_REPOSITORY_URL"]
    assert re.fullmatch(r"https://github\.com/[^/]+/[^/]+", repository), repository
    assert "SlicerHLIP_RAW_URL" not in values  # derived from the repository's URL, not typed a second time
    assert ("string", "REPLACE https://github.com/ https://raw.githubusercontent.com/ SlicerHLIP_RAW_URL ${SlicerHLIP_REPOSITORY_URL}") in calls
    assert ("string", "APPEND SlicerHLIP_RAW_URL /main") in calls
    assert values["EXTENSION_HOMEPAGE"].startswith("${SlicerHLIP_REPOSITORY_URL}")
    icon = values["EXTENSION_ICONURL"]
    assert icon.startswith("${SlicerHLIP_RAW_URL}/") and (REPO / icon.split("}/", 1)[1]).is_file(), icon
    screenshots = values["EXTENSION_SCREENSHOTURLS"].split()
    assert screenshots
    for url in screenshots:  # committed, small PNGs
        assert url.startswith("${SlicerHLIP_RAW_URL}/") and url.endswith(".png"), url
        data = (REPO / url.split("}/", 1)[1]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 600_000, (url, len(data))
    assert len(values["EXTENSION_DESCRIPTION"].split(".")[0]) > 40  # a sentence a non-expert can read
    assert (REPO / "LICENSE.txt").is_file()


# -- the panel ---------------------------------------------------------------------------------------


def ui_tree():
    return ET.parse(UI_FILE).getroot()


def test_the_ui_file_is_valid_qt_designer_xml():
    root = ui_tree()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == "SlicerHLIP"
    top = root.findall("widget")
    assert len(top) == 1 and top[0].get("class") == "qMRMLWidget" and top[0].get("name") == "SlicerHLIP"
    names = [w.get("name") for w in root.iter("widget")] + [layout.get("name") for layout in root.iter("layout")]
    assert all(names) and len(names) == len(set(names)), "every widget and layout needs a unique name"
    custom = {c.findtext("class"): c for c in root.iter("customwidget")}
    for c in custom.values():
        assert c.findtext("extends") and c.findtext("header"), ET.tostring(c)
    for w in root.iter("widget"):
        assert w.get("class") in QT_CLASSES or w.get("class") in custom, f"{w.get('name')}: undeclared class {w.get('class')}"
    for layout in root.iter("layout"):
        assert layout.get("class") in QT_LAYOUTS, layout.get("class")
        for item in layout.findall("item"):
            assert len(list(item)) == 1 and list(item)[0].tag in ("widget", "layout", "spacer"), ET.tostring(item)[:200]
            if layout.get("class") in ("QFormLayout", "QGridLayout"):
                assert item.get("row") is not None and item.get("column") is not None
    for prop in root.iter("property"):
        assert prop.get("name") and len(list(prop)) == 1, ET.tostring(prop)[:200]
    widget_names = {w.get("name") for w in root.iter("widget")}
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in widget_names and connection.findtext("receiver") in widget_names
    # the MRML widgets receive the scene
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML") and w.get("name") != "SlicerHLIP"} <= receivers


def ui_names_used_by_the_module() -> set:
    tree = ast.parse(MODULE_FILE.read_text())
    used = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    return used


def test_every_widget_the_module_uses_is_defined_in_the_ui_file():
    defined = {w.get("name") for w in ui_tree().iter("widget")}
    used = ui_names_used_by_the_module()
    assert len(used) > 25, f"the widget class uses only {sorted(used)}"
    assert used - defined == set(), "self.ui.<name> without a widget of that name in SlicerHLIP.ui"


def test_every_interactive_widget_of_the_panel_is_wired():
    interactive = {w.get("name") for w in ui_tree().iter("widget")
                   if w.get("class") in ("QPushButton", "QComboBox", "QLineEdit", "QPlainTextEdit", "QCheckBox", "QListWidget",
                                         "QTableWidget", "QSpinBox", "ctkSliderWidget", "qMRMLTableView")}
    assert interactive - ui_names_used_by_the_module() == set(), "widgets in the panel that the module never reads or connects"


# -- Python -----------------------------------------------------------------------------------------


def test_every_module_python_file_compiles(tmp_path):
    for path in SLICER_MODULE.rglob("*.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


def test_the_module_file_defines_the_four_slicer_classes():
    tree = ast.parse(MODULE_FILE.read_text())
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    bases = {name: [b.id for b in c.bases if isinstance(b, ast.Name)] for name, c in classes.items()}
    assert bases["SlicerHLIP"] == ["ScriptedLoadableModule"]
    assert bases["SlicerHLIPWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["SlicerHLIPLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["SlicerHLIPTest"] == ["ScriptedLoadableModuleTest"]
    init = next(f for f in classes["SlicerHLIP"].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assigned = {t.attr for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Attribute)}
    assert {"title", "categories", "contributors", "helpText", "acknowledgementText"} <= assigned
    test_methods = {f.name for f in classes["SlicerHLIPTest"].body if isinstance(f, ast.FunctionDef)}
    assert "runTest" in test_methods and len([m for m in test_methods if m.startswith("test_")]) >= 3
    # the logic never touches the panel
    logic = ast.unparse(classes["SlicerHLIPLogic"])
    assert "self.ui" not in logic and "qt." not in logic


def test_the_client_layer_imports_without_slicer_qt_vtk_or_numpy():
    # SimpleITK is imported only when a heat map's grid is read
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('slicer', 'qt', 'vtk', 'ctk', 'numpy', 'requests', 'SimpleITK', 'nibabel'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(SLICER_MODULE)!r})\n"
        "import SlicerHLIPLib\n"
        "from SlicerHLIPLib import client, errors, findings, multipart, settings, study, tasks, volumefile\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('slicer', 'qt', 'vtk', 'numpy')))\n"
        "print(len(SlicerHLIPLib.load_regions()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "3"]


def test_the_icon_is_a_small_128x128_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)
    assert len(data) < 64 * 1024


def test_the_default_findings_cover_three_regions_within_the_servers_limits():
    data = json.loads((SLICER_MODULE / "Resources" / "DefaultFindings.json").read_text())
    regions = {r["name"]: r for r in data["regions"]}
    assert set(regions) == {"Head CT", "Brain MRI", "Chest CT"}
    for region in regions.values():
        assert region["modality"] in ("CT", "MR")
        assert 5 <= len(region["findings"]) <= 32 and len(set(region["findings"])) == len(region["findings"])
        assert all(0 < len(f) <= 300 and f == f.strip() for f in region["findings"])
    # the chest CT list is the 18 CT-RATE abnormalities the project evaluates on
    ct_rate = json.loads((REPO / "hlip_core" / "eval" / "prompts" / "ct-rate.json").read_text())
    assert sorted(f.lower() for f in regions["Chest CT"]["findings"]) == sorted(f["name"].lower() for f in ct_rate["findings"])


@pytest.mark.parametrize("path", ["SlicerHLIP/SlicerHLIP.py", "SlicerHLIP/SlicerHLIPLib/client.py"])
def test_no_machine_specific_paths(path):
    text = (REPO / path).read_text()
    assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text


def test_every_public_method_of_the_widget_and_the_logic_has_a_docstring():
    tree = ast.parse((SLICER_MODULE / "SlicerHLIP.py").read_text())
    missing = [f"{c.name}.{f.name}" for c in tree.body if isinstance(c, ast.ClassDef) and c.name in ("SlicerHLIPWidget", "SlicerHLIPLogic")
               for f in c.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_") and not ast.get_docstring(f)]
    assert not missing, missing


def test_the_module_reads_and_writes_volumes_only_with_slicers_own_readers_and_writers():
    text = (SLICER_MODULE / "SlicerHLIP.py").read_text()
    assert not (SLICER_MODULE / "SlicerHLIPLib" / "nifti.py").exists()
    for hand_written in ("nifti", "write_nifti", "read_voxels", "slicer.util.loadVolume", "slicer.util.saveNode"):
        assert hand_written not in text, hand_written
    assert "vtkMRMLVolumeArchetypeStorageNode" in text and "AddArchetypeVolume" in text
