"""SlicerHLIP: ask a CT/MRI study in free text and see the findings, with an HLIP MONAI Label server.

The module is two layers. ``SlicerHLIPLib`` (plain Python, no slicer/qt/vtk) talks to the server,
parses answers, remembers settings and decides what to send; this file only turns volume nodes
into files and answers into nodes (a findings table, a heat-map volume), with Slicer's own
storage nodes and Volumes logic, keeps the panel's state in a parameter node (saved with the
scene), and wires the panel. Every request runs on a worker thread; the panel polls it with a
QTimer, so the GUI never waits for the network (only for writing a volume file or reading one heat
map, both done by Slicer's readers and writers on the main thread).
"""
import logging
import os
import shutil
import tempfile

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

from SlicerHLIPLib import (TABLE_COLUMNS, AuthenticationRequired, BackgroundTask, Cancelled, HLIPClient, HLIPError,
                           LocalVolume, MemorySettings, RememberedSettings, ask, default_selection, findings_preview, is_flagged,
                           load_regions, model_row_of_table_row, normalize_url, parse_findings_text, plan_question, region_named,
                           table_row_of_model_row, table_rows, table_sort_keys, with_server_defaults)
from SlicerHLIPLib.findings import findings_text

HOMEPAGE = "https://github.com/hlip-slicer/SlicerHLIP#readme"
MODULE_NAME = "SlicerHLIP"
HEATMAP_ATTRIBUTE = "HLIP.heatmap"
HEATMAP_NODE_NAME = "HLIP heat map"
# The panel's state in the scene's parameter node (a vtkMRMLScriptedModuleNode, saved with the
# scene): parameter -> (type, settings attribute that gives its default).
PARAMETERS = {
    "ServerURL": (str, "server_url"),
    "FindingsText": (str, "findings_text"),
    "SelectedFinding": (str, None),
    "HeatmapOpacity": (float, "heatmap_opacity"),
    "HeatmapThreshold": (float, "heatmap_threshold"),
}
FINDINGS_TABLE_REFERENCE = "FindingsTable"
HEATMAP_REFERENCE = "Heatmap"
SERVER_STUDY_ATTRIBUTE = "HLIP.serverStudy"
SERVER_IMAGE_ATTRIBUTE = "HLIP.serverImage"
SERVER_STUDY_IMAGES_ATTRIBUTE = "HLIP.serverStudyImages"
WARM_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeWarm1")
POLL_MS = 100
SORT_ROLE = qt.Qt.UserRole + 101  # the findings table view sorts on this role: numbers for numeric columns
FLAGGED_ROW_COLOR = (255, 140, 0, 110)  # RGBA: a translucent orange over the view's own background, light or dark


#
# SlicerHLIP
#


class SlicerHLIP(ScriptedLoadableModule):
    def __init__(self, parent):
        """The module's title, category, contributors, help and acknowledgement."""
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("HLIP Study Findings")
        self.parent.categories = [_("Informatics")]
        self.parent.dependencies = []
        self.parent.contributors = ["HLIP project developers"]
        self.parent.helpText = _(
            "Ask a CT or MRI study in free text ('midline shift', 'pleural effusion') and see, for each finding, "
            "a probability, the scan that drives it, and a heat map over that scan. Search the server's studies by text. "
            "Needs an HLIP server (MONAI Label with the HLIP app), started with one command. "
            "The probabilities come from a zero-shot language-image model: they rank and point, they are not diagnoses. "
            'See the <a href="{homepage}">extension\'s documentation</a>.').format(homepage=HOMEPAGE)
        self.parent.acknowledgementText = _(
            "The model follows 'Towards Scalable Language-Image Pre-training for 3D Medical Imaging' (HLIP; Zhao et al., 2025). "
            "The server is built on MONAI Label (Project MONAI). The module layout follows 3D Slicer's scripted module template "
            "and the SlicerTotalSegmentator and SlicerMONAIAuto3DSeg extensions.")


class QSettingsStore:
    """SlicerHLIPLib's settings store on Slicer's application settings."""

    def value(self, key, default=None):
        """The setting ``key``, or ``default`` when unset."""
        value = qt.QSettings().value(key)
        return default if value is None else value

    def set_value(self, key, value):
        """Remember ``value`` as setting ``key``."""
        qt.QSettings().setValue(key, value)


#
# SlicerHLIPWidget
#


class SlicerHLIPWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wiring only: reads the panel, calls the logic, shows results and errors."""

    def __init__(self, parent=None):
        """The panel before setup(): no widgets, no logic, no observers yet."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._task = None
        self._onTaskDone = None
        self._timer = None
        self._volumesTimer = None
        self._listedVolumeIDs = set()  # node ids in the volume list, so that new ones get the default check

    def setup(self):
        """Build the panel from SlicerHLIP.ui, create the logic, fill the controls from the scene's parameter
        node (else the remembered settings), wire the signals and observe the scene."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerHLIP.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerHLIPLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._pollTask)
        self._volumesTimer = qt.QTimer()  # one refresh of the volume list for a burst of scene changes
        self._volumesTimer.setSingleShot(True)
        self._volumesTimer.setInterval(200)
        self._volumesTimer.connect("timeout()", self.refreshVolumes)

        settings = self.logic.settings
        self.ui.serverUrlComboBox.addItems(settings.recent_server_urls or [settings.server_url])
        self.ui.serverUrlComboBox.setCurrentText(settings.server_url)
        self.ui.loginFrame.hide()
        for region in self.logic.regions:
            self.ui.regionComboBox.addItem(region.name)
        if settings.region:
            self.ui.regionComboBox.setCurrentText(settings.region)
        self.ui.findingsTextEdit.setPlainText(settings.findings_text or findings_text(self.logic.regions[0].findings))
        self.ui.probabilityThresholdSliderWidget.value = settings.probability_threshold
        self.ui.heatmapOpacitySliderWidget.value = settings.heatmap_opacity
        self.ui.heatmapThresholdSliderWidget.value = settings.heatmap_threshold
        self.ui.searchResultsTableWidget.setColumnCount(3)
        self.ui.searchResultsTableWidget.setHorizontalHeaderLabels([_("Study"), _("Score"), _("Scans")])
        self.ui.searchResultsTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.progressBar.setRange(0, 1000)
        self.ui.findingsTableView.sortFilterProxyModel().setSortRole(SORT_ROLE)  # keys set by _decorateFindingsTable

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.loginButton.connect("clicked(bool)", self.onLogin)
        self.ui.passwordLineEdit.connect("returnPressed()", self.onLogin)
        self.ui.refreshVolumesButton.connect("clicked(bool)", self.refreshVolumes)
        self.ui.refreshServerStudiesButton.connect("clicked(bool)", self.onListServerStudies)
        self.ui.loadServerStudyButton.connect("clicked(bool)", self.onLoadServerStudy)
        self.ui.useRegionDefaultsButton.connect("clicked(bool)", self.onUseRegionDefaults)
        self.ui.regionComboBox.connect("currentTextChanged(QString)", self.onRegionChanged)
        self.ui.findingsTextEdit.connect("textChanged()", self.onFindingsTextChanged)
        self.ui.askButton.connect("clicked(bool)", self.onAsk)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingSelected)
        self.ui.probabilityThresholdSliderWidget.connect("valueChanged(double)", self.onProbabilityThresholdChanged)
        self.ui.heatmapOpacitySliderWidget.connect("valueChanged(double)", self.onHeatmapDisplayChanged)
        self.ui.heatmapThresholdSliderWidget.connect("valueChanged(double)", self.onHeatmapDisplayChanged)
        self.ui.volumeRenderingCheckBox.connect("toggled(bool)", self.onHeatmapDisplayChanged)
        self.ui.searchButton.connect("clicked(bool)", self.onSearch)
        self.ui.searchLineEdit.connect("returnPressed()", self.onSearch)
        self.ui.loadSearchResultButton.connect("clicked(bool)", self.onLoadSearchResult)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.updateGUIFromParameterNode()
        self.refreshVolumes()
        self._setBusy(False)

    def updateGUIFromParameterNode(self):
        """Show the parameter node's state in the panel (server address, findings text, heat-map
        opacity and threshold); values the node does not hold yet come from the remembered settings."""
        logic = self.logic
        url = logic.parameter("ServerURL")
        if url:
            self.ui.serverUrlComboBox.setCurrentText(url)
        text = logic.getParameterNode().GetParameter("FindingsText")
        if text:
            self.ui.findingsTextEdit.setPlainText(text)
        self.ui.heatmapOpacitySliderWidget.value = logic.parameter("HeatmapOpacity")
        self.ui.heatmapThresholdSliderWidget.value = logic.parameter("HeatmapThreshold")

    def onSceneEndImport(self, caller=None, event=None):
        """A scene was loaded (e.g. a .mrb): take its parameter node's state, its findings table
        (shown, flagged rows highlighted) and select the finding it was saved with."""
        self.logic.restoreFromScene()
        self.updateGUIFromParameterNode()
        table = self.logic.tableNode
        self.ui.findingsTableView.setMRMLTableNode(table)
        if table is None:
            return
        self._decorateFindingsTable()
        self.ui.resultsCollapsibleButton.collapsed = False
        selected = self.logic.parameter("SelectedFinding")
        for row, item in enumerate(self.logic.tableRows):
            if item["Finding"] == selected:
                self._selectFindingRow(row)
                break

    def cleanup(self):
        """Called when the module is closed or reloaded: cancel a running request, stop the timers,
        remove the observers and the logic's temporary files."""
        if self._task is not None and not self._task.done:
            self._task.cancel()
        for timer in (self._timer, self._volumesTimer):
            if timer is not None:
                timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    # -- background tasks --------------------------------------------------------------------------

    def _run(self, task, onDone, startMessage):
        if self._task is not None and not self._task.done:
            slicer.util.warningDisplay(_("Wait for the current request to finish, or cancel it."))
            return
        self._task, self._onTaskDone = task, onDone
        self.ui.statusLabel.text = startMessage
        self._setBusy(True)
        task.start()
        self._timer.start()

    def _pollTask(self):
        task = self._task
        if task is None:
            self._timer.stop()
            return
        fraction, message = task.progress.snapshot()
        if fraction is None:
            self.ui.progressBar.setRange(0, 0)  # an indeterminate bar while the server works
        else:
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.value = int(1000 * fraction)
        if message:
            self.ui.statusLabel.text = self._progressText(message)
        if not task.done:
            return
        self._timer.stop()
        self._setBusy(False)
        onDone, self._task, self._onTaskDone = self._onTaskDone, None, None
        try:
            value = task.result()
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled.")
            return
        except BaseException as e:
            self._showError(e)
            return
        try:
            onDone(value)
        except BaseException as e:
            self._showError(e)

    @staticmethod
    def _progressText(message):
        """A worker's progress message in the user's language (worker threads never call the translator)."""
        known = {
            "Uploading": _("Uploading"),
            "The server is reading the study and computing the findings": _("The server is reading the study and computing the findings"),
            "Findings received": _("Findings received"),
            "Receiving the findings and heat maps": _("Receiving the findings and heat maps"),
        }
        return known.get(message, message)

    def _setBusy(self, busy):
        self.ui.cancelButton.enabled = busy
        for button in (self.ui.connectButton, self.ui.loginButton, self.ui.askButton, self.ui.searchButton,
                       self.ui.loadServerStudyButton, self.ui.loadSearchResultButton, self.ui.refreshServerStudiesButton):
            button.enabled = not busy
        if not busy:
            self.ui.progressBar.setRange(0, 1000)

    def _showError(self, error):
        if isinstance(error, AuthenticationRequired):
            self.ui.loginFrame.show()
            self.ui.serverStatusLabel.text = str(error)
            self.ui.usernameLineEdit.setFocus()
            return
        if isinstance(error, HLIPError):
            logging.warning("SlicerHLIP: %s (%s)", error, error.detail)
            self.ui.statusLabel.text = str(error)
            details = {"detailedText": error.detail} if error.detail else {}
            slicer.util.errorDisplay(str(error), **details)
        elif isinstance(error, ValueError):  # input the user can fix
            self.ui.statusLabel.text = str(error)
            slicer.util.warningDisplay(str(error))
        else:
            logging.exception("SlicerHLIP failed", exc_info=error)
            slicer.util.errorDisplay(_("SlicerHLIP failed: ") + str(error))

    def onCancel(self):
        """Cancel button: ask the running request to stop (uploads stop between chunks; a wait for the
        server is abandoned at once)."""
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    # -- server --------------------------------------------------------------------------------------

    def onConnect(self):
        """Connect button: connect to the address typed in 'Server', in the background."""
        try:
            task = self.logic.connectTask(self.ui.serverUrlComboBox.currentText)
        except ValueError as e:
            self._showError(e)
            return
        self.ui.serverStatusLabel.text = _("Connecting...")
        self._run(task, self._onConnected, _("Connecting to the server..."))

    def _onConnected(self, info):
        self.logic.settings.server_url = info.url  # remembered once the server has answered
        self.logic.setParameter("ServerURL", info.url)
        self.ui.loginFrame.hide()
        self.ui.passwordLineEdit.clear()
        if self.ui.serverUrlComboBox.findText(info.url) < 0:
            self.ui.serverUrlComboBox.insertItem(0, info.url)
        studies = info.datastore.get("studies", info.datastore.get("total", "?"))
        text = _("Connected to {server} {version}: model '{model}', {studies} studies in its datastore.").format(
            server=info.name, version=info.version, model=info.model, studies=studies)
        others = [f"{name} ({kind})" for name, kind in info.models.items() if name != info.model]
        if others:
            text += " " + _("Other models on this server (not used here): {models}.").format(models=", ".join(others))
        serverDefaults = _("Server defaults")
        if info.default_findings:
            shown, hidden = findings_preview(info.default_findings)
            text += " " + _("Its {count} default findings: {findings}").format(count=len(info.default_findings), findings="; ".join(shown))
            if hidden:
                text += " " + _("(and {count} more)").format(count=hidden)
            text += ". " + _("To ask them, choose '{entry}' under 'Start from' and press 'Use its findings'.").format(entry=serverDefaults)
        else:
            text += " " + _("It names no default findings.")
        self.ui.serverStatusLabel.text = text
        self.ui.serverStatusLabel.toolTip = findings_text(info.default_findings)  # the whole list
        self._offerServerDefaults(serverDefaults, info.default_findings)
        self.ui.statusLabel.text = ""
        self.ui.heatmapsCheckBox.enabled = info.heatmaps  # a server may have heat maps switched off
        if not info.heatmaps:
            self.ui.heatmapsCheckBox.checked = False
        if not self.ui.findingsTextEdit.toPlainText().strip() and info.default_findings:  # never replaces typed findings
            self.ui.findingsTextEdit.setPlainText(findings_text(info.default_findings))
        self.onListServerStudies()

    def _offerServerDefaults(self, name, findings):
        """The server's default findings as one more entry of the default lists ('Start from'), beside
        the body regions; a previous server's entry is replaced, or removed when this one names none.
        The findings text is not touched: the user picks the entry and presses 'Use its findings'."""
        previous = [r.name for r in self.logic.regions if r.from_server]
        self.logic.regions = with_server_defaults(self.logic.regions, findings, name)
        combo = self.ui.regionComboBox
        for old in previous:
            if old != name or not findings:
                index = combo.findText(old)
                if index >= 0:
                    combo.removeItem(index)
        if findings and combo.findText(name) < 0:
            combo.addItem(name)
            if self.logic.settings.region == name:  # the list chosen last time
                combo.setCurrentText(name)

    def onLogin(self):
        """Log in button (shown when the server asks for it): log in with the user name and password."""
        try:
            task = self.logic.loginTask(self.ui.usernameLineEdit.text, self.ui.passwordLineEdit.text)
        except ValueError as e:
            self._showError(e)
            return
        self._run(task, self._onConnected, _("Logging in..."))

    def onListServerStudies(self):
        """Refresh button of 'Server study': list the server's datastore studies."""
        try:
            task = self.logic.studiesTask()
        except ValueError as e:
            self._showError(e)
            return
        self._run(task, self._onServerStudies, _("Listing the server's studies..."))

    def _onServerStudies(self, studies):
        self.ui.serverStudyComboBox.clear()
        for study in studies:
            self.ui.serverStudyComboBox.addItem(f"{study.study_id} ({len(study.scans)} scans)", study.study_id)
        self.ui.statusLabel.text = _("{count} studies on the server.").format(count=len(studies))

    def onLoadServerStudy(self):
        """Load button of 'Server study': download the chosen study and load its scans."""
        self._loadServerStudy(self.ui.serverStudyComboBox.currentData)

    def _loadServerStudy(self, studyId):
        if not studyId:
            slicer.util.warningDisplay(_("Choose a study first."))
            return
        try:
            task = self.logic.downloadStudyTask(studyId)
        except ValueError as e:
            self._showError(e)
            return
        self._run(task, lambda loaded: self._onStudyDownloaded(studyId, loaded), _("Downloading study {study}...").format(study=studyId))

    def _onStudyDownloaded(self, studyId, loaded):
        nodes = self.logic.loadDownloadedStudy(studyId, loaded)
        self.refreshVolumes()
        self._checkOnly([node.GetID() for node in nodes])  # the loaded study alone: it is asked by its id
        self.ui.statusLabel.text = _("Loaded {count} volumes of study {study}; they are the checked volumes.").format(
            count=len(nodes), study=studyId)

    # -- volumes -------------------------------------------------------------------------------------

    def onSceneNodesChanged(self, caller=None, event=None):
        """A node was added to or removed from the scene: refresh the volume list once the burst is over."""
        self._volumesTimer.start()  # after the scene has finished adding or removing

    def onSceneEndClose(self, caller=None, event=None):
        """The scene was closed: forget the answer, refresh the volume list."""
        self.logic.forgetAnswer()
        self.refreshVolumes()

    def refreshVolumes(self):
        """Refill the volume list from the scene, keeping the user's checks (new volumes of the active
        study are checked)."""
        if self.logic is None:
            return
        volumes = self.logic.sceneVolumes()
        default = set(self.logic.defaultSelection(volumes))
        if self._listedVolumeIDs:  # keep the user's choice; volumes new to the list follow the default rule
            checked = set(self._checkedVolumeIDs()) | {k for k in default if k not in self._listedVolumeIDs}
        else:
            checked = default
        self.ui.volumesListWidget.clear()
        self._listedVolumeIDs = set()
        for volume in volumes:
            text = volume.name + (f"  [{volume.modality}]" if volume.modality else "")
            item = qt.QListWidgetItem(text)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if volume.key in checked else qt.Qt.Unchecked)
            item.setData(qt.Qt.UserRole, volume.key)
            self.ui.volumesListWidget.addItem(item)
            self._listedVolumeIDs.add(volume.key)

    def _checkOnly(self, nodeIDs):
        """Check exactly these volumes in the list (and uncheck the others)."""
        wanted = set(nodeIDs)
        for row in range(self.ui.volumesListWidget.count):
            item = self.ui.volumesListWidget.item(row)
            item.setCheckState(qt.Qt.Checked if item.data(qt.Qt.UserRole) in wanted else qt.Qt.Unchecked)

    def _checkedVolumeIDs(self):
        out = []
        for row in range(self.ui.volumesListWidget.count):
            item = self.ui.volumesListWidget.item(row)
            if item.checkState() == qt.Qt.Checked:
                out.append(item.data(qt.Qt.UserRole))
        return out

    # -- ask -------------------------------------------------------------------------------------------

    def onRegionChanged(self, name):
        """'Start from' changed: remember the chosen list of findings."""
        self.logic.settings.region = name

    def onUseRegionDefaults(self):
        """'Use its findings' button: put the chosen list's findings in the findings text."""
        region = region_named(self.ui.regionComboBox.currentText, self.logic.regions)
        self.ui.findingsTextEdit.setPlainText(findings_text(region.findings))

    def onFindingsTextChanged(self):
        """The findings text changed: remember it (settings and parameter node)."""
        self.logic.settings.findings_text = self.ui.findingsTextEdit.toPlainText()
        self.logic.setParameter("FindingsText", self.ui.findingsTextEdit.toPlainText())

    def onAsk(self):
        """Ask button: send the checked volumes (or the server study's id) with the findings text."""
        try:
            findings = parse_findings_text(self.ui.findingsTextEdit.toPlainText(), self.logic.maxFindings())
            task = self.logic.startQuestion(self._checkedVolumeIDs(), findings, heatmaps=self.ui.heatmapsCheckBox.checked,
                                            regionName=self.ui.regionComboBox.currentText)
        except (ValueError, HLIPError) as e:
            self._showError(e)
            return
        self._run(task, self._onAnswer, _("Sending the study..."))

    def _onAnswer(self, answer):
        table = self.logic.showAnswer(answer, self.ui.probabilityThresholdSliderWidget.value)
        self.ui.findingsTableView.setMRMLTableNode(table)
        self._decorateFindingsTable()
        self.ui.resultsCollapsibleButton.collapsed = False
        result = answer.result
        flagged = [r.finding for r in result.rows if r.probability >= self.ui.probabilityThresholdSliderWidget.value]
        text = _("{count} findings in {seconds:.1f} s; {flagged} at or above the flag threshold (highlighted).").format(
            count=len(result.rows), seconds=result.seconds, flagged=len(flagged))
        if result.skipped:
            text += " " + _("The server skipped {count} series:").format(count=len(result.skipped)) + " " + "; ".join(result.skipped[:3])
        self.ui.statusLabel.text = text
        if result.rows:
            self._selectFindingRow(0)  # the first finding asked, wherever the sorting shows it

    # -- results ---------------------------------------------------------------------------------------

    def _titlesInHeader(self):
        tableNode = self.ui.findingsTableView.mrmlTableNode()
        return tableNode is not None and self.logic.columnTitlesInHeader(tableNode)

    def _tableRowOf(self, viewIndex):
        """The findings table node's row (= the finding's index) shown at ``viewIndex`` of the view,
        or None: through the view's sort proxy to the table model, then to the table node."""
        view = self.ui.findingsTableView
        tableNode = view.mrmlTableNode()
        if tableNode is None or not viewIndex.isValid():
            return None
        modelIndex = view.sortFilterProxyModel().mapToSource(viewIndex)
        try:
            row = view.tableModel().mrmlTableRowIndex(modelIndex)
        except AttributeError:  # not wrapped for Python: the same rule, from the node's header setting
            return table_row_of_model_row(modelIndex.row(), self._titlesInHeader(), tableNode.GetNumberOfRows())
        return row if 0 <= row < tableNode.GetNumberOfRows() else None

    def _selectFindingRow(self, tableRow):
        """Select the view's row that shows row ``tableRow`` of the findings table node."""
        view = self.ui.findingsTableView
        modelIndex = view.tableModel().index(model_row_of_table_row(tableRow, self._titlesInHeader()), 0)
        viewIndex = view.sortFilterProxyModel().mapFromSource(modelIndex)
        if viewIndex.isValid():
            view.selectRow(viewIndex.row())

    def _selectedFindingRow(self):
        view = self.ui.findingsTableView
        selected = view.selectionModel().selectedRows() if view.selectionModel() else []
        if not selected:
            return None
        return self._tableRowOf(selected[0])  # the table may be sorted

    def _decorateFindingsTable(self):
        """Sort keys (numbers for the numeric columns) and a highlight (translucent orange, bold) for
        the findings at or above the flag threshold, on the table view's items. Slicer's table model
        shows every cell as text and has no per-row style, and it keeps these item roles when it
        updates its cells, so they are set again after each fill of the table node."""
        view = self.ui.findingsTableView
        model = view.tableModel()
        if model is None or view.mrmlTableNode() is None:
            return
        titlesInHeader = self._titlesInHeader()
        highlight = qt.QBrush(qt.QColor(*FLAGGED_ROW_COLOR))
        bold = qt.QFont()
        bold.setBold(True)
        wasBlocked = model.blockSignals(True)  # no itemChanged: the model would write the cells back to the node
        try:
            for tableRow, row in enumerate(self.logic.tableRows):
                flagged = is_flagged(row)
                for column, key in enumerate(table_sort_keys(row)):
                    item = model.item(model_row_of_table_row(tableRow, titlesInHeader), column)
                    if item is None:
                        continue
                    item.setData(key, SORT_ROLE)
                    item.setData(highlight if flagged else qt.QBrush(), qt.Qt.BackgroundRole)
                    item.setData(bold if flagged else qt.QFont(), qt.Qt.FontRole)
        finally:
            model.blockSignals(wasBlocked)
        view.sortFilterProxyModel().invalidate()  # re-sort on the new keys and repaint (the selection is kept)

    def onFindingSelected(self):
        """A row of the findings table was selected: show its heat map."""
        self.onHeatmapDisplayChanged()

    def onHeatmapDisplayChanged(self, *args):
        """Opacity, threshold or volume rendering changed (or a row was selected): remember the values and
        show the selected finding's heat map with them."""
        settings = self.logic.settings
        settings.heatmap_opacity = self.ui.heatmapOpacitySliderWidget.value
        settings.heatmap_threshold = self.ui.heatmapThresholdSliderWidget.value
        self.logic.setParameter("HeatmapOpacity", self.ui.heatmapOpacitySliderWidget.value)
        self.logic.setParameter("HeatmapThreshold", self.ui.heatmapThresholdSliderWidget.value)
        row = self._selectedFindingRow()
        if row is None:
            return
        try:
            node = self.logic.showHeatmap(row, self.ui.heatmapOpacitySliderWidget.value, self.ui.heatmapThresholdSliderWidget.value,
                                          self.ui.volumeRenderingCheckBox.checked)
        except BaseException as e:
            self._showError(e)
            return
        if node is None:
            self.ui.statusLabel.text = _("No heat map for this finding (ask with 'Heat map per finding' checked).")

    def onProbabilityThresholdChanged(self, value):
        """The flag threshold changed: re-flag and re-highlight the table's rows."""
        self.logic.settings.probability_threshold = value
        self.logic.updateFlags(value)
        self._decorateFindingsTable()

    # -- search -----------------------------------------------------------------------------------------

    def onSearch(self):
        """Search button (or Return): find the server's studies that match the text."""
        try:
            task = self.logic.searchTask(self.ui.searchLineEdit.text, self.ui.searchCountSpinBox.value)
        except ValueError as e:
            self._showError(e)
            return
        self._run(task, self._onSearchResult, _("Searching..."))

    def _onSearchResult(self, result):
        table = self.ui.searchResultsTableWidget
        table.setRowCount(len(result.hits))
        for row, hit in enumerate(result.hits):
            table.setItem(row, 0, qt.QTableWidgetItem(hit.study_id))
            table.setItem(row, 1, qt.QTableWidgetItem(f"{hit.score:.3f}"))
            table.setItem(row, 2, qt.QTableWidgetItem(", ".join(sc.description or sc.image_id for sc in hit.scans)))
        text = _("{count} studies match '{query}'.").format(count=len(result.hits), query=result.query)
        if result.pending:
            text += " " + _("{count} studies are not indexed yet.").format(count=result.pending)
        self.ui.statusLabel.text = text

    def onLoadSearchResult(self):
        """Load button of the search results: download and load the selected study."""
        rows = self.ui.searchResultsTableWidget.selectionModel().selectedRows()
        if not rows:
            slicer.util.warningDisplay(_("Select a study in the search results first."))
            return
        self._loadServerStudy(self.ui.searchResultsTableWidget.item(rows[0].row(), 0).text())


#
# SlicerHLIPLogic
#


class SlicerHLIPLogic(ScriptedLoadableModuleLogic):
    """Nodes to files and answers to nodes; the network work is handed to SlicerHLIPLib and run as
    BackgroundTasks (started by the caller). Methods that touch the scene run on the main thread."""

    def __init__(self, settingsStore=None):
        """``settingsStore``: where settings are remembered between sessions (Slicer's QSettings by
        default; MemorySettings in tests)."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.settings = RememberedSettings(settingsStore if settingsStore is not None else QSettingsStore())
        self.regions = load_regions()
        self.client = None
        self.serverInfo = None
        self.answer = None
        self.tableNode = None
        self.tableRows = []  # the rows (SlicerHLIPLib table_rows) last put in the table node, in its order
        self.heatmapNodeID = None  # the heat-map volume node (one for every finding)
        self.shownRow = None  # the finding whose map that node holds
        self._workDir = None

    def workDir(self):
        """A temporary folder for this session's files (uploads, downloads, heat maps), made on first use."""
        if self._workDir is None or not os.path.isdir(self._workDir):
            self._workDir = tempfile.mkdtemp(prefix="SlicerHLIP-")
        return self._workDir

    def cleanup(self):
        """Delete the temporary folder."""
        if self._workDir:
            shutil.rmtree(self._workDir, ignore_errors=True)
            self._workDir = None

    # -- server ------------------------------------------------------------------------------------

    def connectTask(self, url):
        """A BackgroundTask that connects (its value: ServerInfo). The caller remembers the URL
        (settings.server_url) once the connection has succeeded."""
        url = normalize_url(url)
        token = self.client.token if self.client is not None and self.client.url == url else None
        client = HLIPClient(url, token=token)
        self.client, self.serverInfo = client, None

        def work(progress, cancel):  # worker thread: no translation, no Qt
            progress(None)
            self.serverInfo = client.connect(cancel)
            return self.serverInfo

        return BackgroundTask(work, "SlicerHLIP connect")

    def loginTask(self, username, password):
        """Log in with MONAI Label's token route, then connect (value: ServerInfo)."""
        client = self.requireClient(connected=False)
        if not username or not password:
            raise ValueError(_("Type the user name and the password."))

        def work(progress, cancel):  # worker thread: no translation, no Qt
            progress(None)
            client.login(username, password, cancel)
            self.serverInfo = client.connect(cancel)
            return self.serverInfo

        return BackgroundTask(work, "SlicerHLIP login")

    def requireClient(self, connected=True):
        """The client of the connected server; ValueError when there is none (or, with
        ``connected=False``, only an address has been given)."""
        if self.client is None or (connected and self.serverInfo is None):
            raise ValueError(_("Connect to an HLIP server first."))
        return self.client

    def maxFindings(self):
        """The most findings the server takes in one question (None: not connected or no limit)."""
        return self.serverInfo.max_findings if self.serverInfo else None

    def studiesTask(self):
        """A BackgroundTask listing the server's datastore studies (value: [StudyListing])."""
        client = self.requireClient()
        return BackgroundTask(lambda progress, cancel: client.studies(cancel), "SlicerHLIP studies")

    def searchTask(self, text, k=10):
        """A BackgroundTask finding the ``k`` studies that best match ``text`` (value: SearchResult);
        ValueError for empty text."""
        client = self.requireClient()
        if not (text or "").strip():
            raise ValueError(_("Type what to look for, e.g. 'hemorrhage with midline shift'."))
        return BackgroundTask(lambda progress, cancel: client.search(text, int(k), cancel), "SlicerHLIP search")

    def downloadStudyTask(self, studyId):
        """A BackgroundTask that downloads every scan of datastore study ``studyId`` to files
        (value: [DownloadedScan]; loadDownloadedStudy reads them into the scene)."""
        client = self.requireClient()
        folder = tempfile.mkdtemp(prefix="study-", dir=self.workDir())

        def work(progress, cancel):
            return client.download_study(studyId, folder, progress, cancel)

        return BackgroundTask(work, "SlicerHLIP download")

    def loadDownloadedStudy(self, studyId, scans):
        """Read downloaded scans (the value of downloadStudyTask) into volume nodes with Slicer's
        Volumes logic; each node remembers its server study and image (node attributes), so that
        asking them again sends only the study's id. Returns the nodes; the first one is shown.
        Nothing is added when one of the files cannot be read (ValueError naming it)."""
        nodes = []
        allImages = "\n".join(scan.image_id for scan in scans)
        try:
            for scan in scans:
                nodes.append(self.loadVolumeFile(scan.path, scan.description or scan.image_id))
        except ValueError:
            for node in nodes:
                slicer.mrmlScene.RemoveNode(node)
            raise
        for scan, node in zip(scans, nodes):
            node.SetAttribute(SERVER_STUDY_ATTRIBUTE, studyId)
            node.SetAttribute(SERVER_IMAGE_ATTRIBUTE, scan.image_id)
            node.SetAttribute(SERVER_STUDY_IMAGES_ATTRIBUTE, allImages)
        if nodes:
            slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)
        return nodes

    # -- volumes -------------------------------------------------------------------------------------

    @staticmethod
    def _firstInstanceUID(volumeNode):
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        return uids[0] if uids else None

    @staticmethod
    def studyInstanceUID(volumeNode):
        """The DICOM StudyInstanceUID of a volume loaded from the DICOM database (None otherwise)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        item = shNode.GetItemByDataNode(volumeNode)
        if item:
            parent = shNode.GetItemParent(item)
            uid = shNode.GetItemUID(parent, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMUIDName()) if parent else ""
            if uid and shNode.GetItemLevel(parent) == slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy():
                return uid
        instance = SlicerHLIPLogic._firstInstanceUID(volumeNode)
        if instance and slicer.dicomDatabase is not None:
            return slicer.dicomDatabase.instanceValue(instance, "0020,000D") or None
        return None

    @staticmethod
    def modalityOf(volumeNode):
        """The DICOM Modality of a volume loaded from Slicer's DICOM database (None otherwise)."""
        instance = SlicerHLIPLogic._firstInstanceUID(volumeNode)
        if instance and slicer.dicomDatabase is not None:
            return slicer.dicomDatabase.instanceValue(instance, "0008,0060") or None
        return None

    def sceneVolumes(self):
        """Scalar volumes of the scene (not label maps, not our heat maps) as LocalVolumes."""
        out = []
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(HEATMAP_ATTRIBUTE) or node.GetImageData() is None:
                continue
            images = node.GetAttribute(SERVER_STUDY_IMAGES_ATTRIBUTE)
            out.append(LocalVolume(key=node.GetID(), name=node.GetName(), study_uid=self.studyInstanceUID(node),
                                   modality=self.modalityOf(node), server_study=node.GetAttribute(SERVER_STUDY_ATTRIBUTE),
                                   server_image=node.GetAttribute(SERVER_IMAGE_ATTRIBUTE),
                                   server_study_images=tuple(images.split("\n")) if images else ()))
        return out

    @staticmethod
    def activeVolumeID():
        """The id of the background volume of the first slice view that shows one (None without views)."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return None
        for name in layoutManager.sliceViewNames():
            composite = layoutManager.sliceWidget(name).mrmlSliceCompositeNode()
            if composite.GetBackgroundVolumeID():
                return composite.GetBackgroundVolumeID()
        return None

    def defaultSelection(self, volumes):
        """The keys of ``volumes`` (LocalVolumes) checked by default: the study of the volume shown
        in the slice views (SlicerHLIPLib.default_selection)."""
        return default_selection(volumes, self.activeVolumeID())

    @staticmethod
    def writeVolumeFile(volumeNode, path):
        """Write a scalar volume node to ``path`` (.nii, .nii.gz, .nrrd) with Slicer's own writer
        (vtkMRMLVolumeArchetypeStorageNode), in the node's local coordinates (IJK-to-RAS; a parent
        transform stays with the node). Returns the path; ValueError when the node holds no scalar
        image or the writer fails."""
        image = volumeNode.GetImageData()
        if image is None:
            raise ValueError(_("Volume '{name}' holds no image.").format(name=volumeNode.GetName()))
        if image.GetNumberOfScalarComponents() != 1:
            raise ValueError(_("Volume '{name}' has several components per voxel; choose a scalar volume.").format(
                name=volumeNode.GetName()))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()  # not added to the scene: the node keeps its own
        storage.SetFileName(str(path))
        storage.SetUseCompression(str(path).endswith(".gz"))
        if not storage.WriteData(volumeNode):
            raise ValueError(_("Slicer could not write volume '{name}' to a file.").format(name=volumeNode.GetName()))
        return str(path)

    @staticmethod
    def loadVolumeFile(path, name):
        """Read the volume file at ``path`` into a new scalar volume node called ``name`` with
        Slicer's Volumes logic (its archetype storage node, display node and default window/level).
        Returns the node; ValueError when Slicer cannot read the file."""
        singleFile = 4  # vtkSlicerVolumesLogic option: this file alone, not a series found beside it
        node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, singleFile)
        if node is None or node.GetImageData() is None:
            if node is not None:
                slicer.mrmlScene.RemoveNode(node)
            raise ValueError(_("Slicer could not read the volume file '{file}'.").format(file=os.path.basename(str(path))))
        return node

    # -- ask -------------------------------------------------------------------------------------------

    def startQuestion(self, nodeIDs, findings, heatmaps=True, regionName=None):
        """Write the chosen volumes (node ids) that must be uploaded as NIfTI files with Slicer's
        writer, and return the BackgroundTask that uploads them and asks ``findings`` (a list of
        strings), with a heat map per finding if ``heatmaps`` (value: SlicerHLIPLib Answer; shown
        by showAnswer). ``regionName``: the findings list the question came from (its modality
        is sent for volumes that name none). The scene is not changed."""
        client = self.requireClient()
        byKey = {v.key: v for v in self.sceneVolumes()}
        chosen = [byKey[k] for k in nodeIDs if k in byKey]
        if not chosen:
            raise ValueError(_("Check the volumes of the study to ask about (or load a study from the server)."))
        modality = region_named(regionName, self.regions).modality if regionName else ""
        if modality:  # the server's default list says none: the server's own default applies
            for volume in chosen:
                volume.modality = volume.modality or modality
        question = plan_question(chosen)
        folder = tempfile.mkdtemp(prefix="question-", dir=self.workDir())
        try:
            files = {volume.key: self.writeVolumeFile(slicer.mrmlScene.GetNodeByID(volume.key), os.path.join(folder, f"scan{i:02d}.nii"))
                     for i, volume in enumerate(question.uploads)}
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        outDir = os.path.join(folder, "heatmaps")

        def work(progress, cancel):  # worker thread: no translation, no Qt
            return ask(client, findings, question, files, heatmaps=heatmaps, out_dir=outDir, progress=progress, cancel=cancel)

        return BackgroundTask(work, "SlicerHLIP findings")

    # -- parameter node ------------------------------------------------------------------------------

    def getParameterNode(self):
        """The scene's SlicerHLIP parameter node (a singleton vtkMRMLScriptedModuleNode, created on
        first use): the panel's state, saved and restored with the scene."""
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(MODULE_NAME)
            node.SetModuleName(MODULE_NAME)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node = scene.AddNode(node)
        return node

    def parameter(self, name):
        """Parameter ``name`` (one of PARAMETERS) of the parameter node, as its type; unset, the
        remembered setting (or "" for the selected finding)."""
        kind, setting = PARAMETERS[name]
        text = self.getParameterNode().GetParameter(name)
        if text:
            return kind(text)
        default = getattr(self.settings, setting) if setting else ""
        return kind(default if default is not None else "")

    def setParameter(self, name, value):
        """Set parameter ``name`` (one of PARAMETERS) of the parameter node to ``value``."""
        if name not in PARAMETERS:
            raise KeyError(name)
        self.getParameterNode().SetParameter(name, "" if value is None else str(value))

    def restoreFromScene(self):
        """After a scene was loaded: take the findings table and heat-map nodes its parameter node
        names (the answer itself, with its heat-map files, is not kept in a scene: ask again to
        see other findings' heat maps)."""
        node = self.getParameterNode()
        self.answer, self.shownRow = None, None
        self.tableNode = node.GetNodeReference(FINDINGS_TABLE_REFERENCE)
        heatmap = node.GetNodeReference(HEATMAP_REFERENCE)
        self.heatmapNodeID = heatmap.GetID() if heatmap is not None else None
        self.tableRows = []
        table = self.tableNode
        for row in range(table.GetNumberOfRows() if table is not None else 0):
            cells = {name: table.GetCellText(row, c) for c, (name, _) in enumerate(TABLE_COLUMNS)}
            cells.update({name: float(cells[name] or 0.0) for name, kind in TABLE_COLUMNS if kind == "double"})
            self.tableRows.append(cells)

    # -- answers ---------------------------------------------------------------------------------------

    def forgetAnswer(self):
        """Remove the heat-map node of the previous answer and forget that answer (the findings
        table node stays; it is refilled by the next answer)."""
        node = slicer.mrmlScene.GetNodeByID(self.heatmapNodeID) if self.heatmapNodeID else None
        if node is not None:
            slicer.mrmlScene.RemoveNode(node)
        self.heatmapNodeID = None
        self.shownRow = None
        self.answer = None
        self.tableRows = []

    def findingsTableNode(self):
        """The findings table node (created on first use, named 'HLIP findings')."""
        if self.tableNode is None or slicer.mrmlScene.GetNodeByID(self.tableNode.GetID()) is None:
            self.tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "HLIP findings")
            self.getParameterNode().SetNodeReferenceID(FINDINGS_TABLE_REFERENCE, self.tableNode.GetID())
        return self.tableNode

    def showAnswer(self, answer, probabilityThreshold=0.5):
        """Put ``answer`` (a SlicerHLIPLib Answer) in the findings table node, one row per finding in
        the question's order, flagged at or above ``probabilityThreshold``; returns the table node.
        Heat maps are read when a row is shown (showHeatmap)."""
        self.forgetAnswer()
        self.answer = answer
        table = self.findingsTableNode()
        self.updateFlags(probabilityThreshold)
        return table

    @staticmethod
    def columnTitlesInHeader(tableNode):
        """Whether the table's views show the column titles as their header (rather than in an
        extra first row). The setting was called ...ColumnName... before Slicer 5.8."""
        if hasattr(tableNode, "GetUseColumnTitleAsColumnHeader"):
            return bool(tableNode.GetUseColumnTitleAsColumnHeader())
        return bool(tableNode.GetUseColumnNameAsColumnHeader())

    @staticmethod
    def setColumnTitlesInHeader(tableNode):
        """Show the column titles of ``tableNode`` as its views' header (see columnTitlesInHeader)."""
        if hasattr(tableNode, "SetUseColumnTitleAsColumnHeader"):
            tableNode.SetUseColumnTitleAsColumnHeader(True)
        else:
            tableNode.SetUseColumnNameAsColumnHeader(True)

    def updateFlags(self, probabilityThreshold):
        """(Re)fill the table: one row per finding, in the question's order (table row i is finding
        i); flagged at or above the threshold. Probability and score are numeric (double) columns."""
        if self.answer is None:
            return
        rows = table_rows(self.answer.result, self.answer.scan_names, probabilityThreshold)
        table = vtk.vtkTable()
        for name, kind in TABLE_COLUMNS:
            column = vtk.vtkDoubleArray() if kind == "double" else vtk.vtkStringArray()
            column.SetName(name)
            for row in rows:
                column.InsertNextValue(row[name])
            table.AddColumn(column)
        tableNode = self.findingsTableNode()
        wasModifying = tableNode.StartModify()  # one update of the views for the three changes
        tableNode.SetAndObserveTable(table)
        self.setColumnTitlesInHeader(tableNode)  # column names in the header: view row 0 is the first finding
        tableNode.SetLocked(True)
        tableNode.EndModify(wasModifying)
        self.tableRows = rows

    def scanNodeOf(self, row):
        """The volume node of the scan that drives finding ``row`` of the last answer, or None."""
        key = self.answer.row_keys.get(row) if self.answer else None
        return slicer.mrmlScene.GetNodeByID(key) if key else None

    def heatmapNode(self, row):
        """The heat-map volume node ('HLIP heat map') holding finding ``row``'s map, or None when
        that finding has none. One node serves every finding: showing another finding reads its
        file into the same node with the node's own storage node (Slicer's reader), so nodes do
        not pile up; the map lies on its scan's voxel grid and follows the scan's transform."""
        if self.answer is None:  # a scene loaded from a file: only the map it was saved with
            node = slicer.mrmlScene.GetNodeByID(self.heatmapNodeID) if self.heatmapNodeID else None
            if node is not None and 0 <= row < len(self.tableRows) and node.GetAttribute(HEATMAP_ATTRIBUTE) == self.tableRows[row]["Finding"]:
                return node
            return None
        if row not in self.answer.result.heatmaps:
            return None
        heatmap = self.answer.result.heatmaps[row]
        node = slicer.mrmlScene.GetNodeByID(self.heatmapNodeID) if self.heatmapNodeID else None
        if node is None:
            node = self.loadVolumeFile(heatmap.path, HEATMAP_NODE_NAME)
            self.heatmapNodeID = node.GetID()
            self.getParameterNode().SetNodeReferenceID(HEATMAP_REFERENCE, node.GetID())
        elif self.shownRow != row:
            storage = node.GetStorageNode()
            storage.SetFileName(heatmap.path)
            if not storage.ReadData(node):
                raise ValueError(_("Slicer could not read the heat map of '{finding}'.").format(finding=heatmap.finding))
        self.shownRow = row
        node.SetAttribute(HEATMAP_ATTRIBUTE, heatmap.finding)
        scan = self.scanNodeOf(row)
        # the file was written in the scan's local space: keep its transform
        node.SetAndObserveTransformNodeID(scan.GetTransformNodeID() if scan is not None else None)
        return node

    @staticmethod
    def warmColorNodeID():
        """The id of the warm colour table heat maps are shown with (Inferno where Slicer has its
        colour files, else the built-in Warm1), or None."""
        for nodeID in WARM_COLOR_NODE_IDS:
            if slicer.mrmlScene.GetNodeByID(nodeID) is not None:
                return nodeID
        return None

    def showHeatmap(self, row, opacity=0.5, threshold=0.2, volumeRendering=False, legend=True):
        """Show finding ``row``'s heat map over its scan in every slice view: foreground layer at
        ``opacity``, warm colours over [0, 1], values below ``threshold`` transparent, with a colour
        legend (Slicer's colour legend display node) if ``legend``; optionally as volume rendering
        in the 3D view. Remembers the finding, opacity and threshold in the parameter node.
        Returns the heat-map node, or None (the finding has no heat map)."""
        node = self.heatmapNode(row)
        if 0 <= row < len(self.tableRows):
            self.setParameter("SelectedFinding", self.tableRows[row]["Finding"])
        self.setParameter("HeatmapOpacity", opacity)
        self.setParameter("HeatmapThreshold", threshold)
        if node is None:
            return None
        display = node.GetDisplayNode()
        colorNodeID = self.warmColorNodeID()
        if colorNodeID:
            display.SetAndObserveColorNodeID(colorNodeID)
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)  # maps are scaled to 1 at their maximum
        display.SetApplyThreshold(True)
        display.SetLowerThreshold(threshold)
        display.SetUpperThreshold(max(1.0, threshold) + 1e6)
        scan = self.scanNodeOf(row)
        slicer.util.setSliceViewerLayers(background=scan if scan is not None else "keep-current", foreground=node,
                                         foregroundOpacity=opacity)
        self._showLegend(node, legend)  # after the layers: the legend's views update when it changes
        self._showVolumeRendering(node if volumeRendering else None, threshold)
        return node

    @staticmethod
    def _showLegend(node, visible):
        """The heat map's colour legend (created on first use); the finding is the node's attribute
        and the table's selected row (a long finding would not fit as the legend's title)."""
        legend = slicer.modules.colors.logic().GetColorLegendDisplayNode(node)
        if legend is None:
            if not visible:
                return
            legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(node)
        legend.SetTitleText(_("Heat map"))
        legend.SetVisibility(bool(visible))

    def _showVolumeRendering(self, node, threshold):
        """Volume rendering of ``node`` (warm colours, transparent below ``threshold``) in the 3D view;
        with ``node`` None, the heat map's volume rendering is hidden."""
        vrLogic = slicer.modules.volumerendering.logic()
        if node is None:
            heatmap = slicer.mrmlScene.GetNodeByID(self.heatmapNodeID) if self.heatmapNodeID else None
            vr = vrLogic.GetFirstVolumeRenderingDisplayNode(heatmap) if heatmap is not None else None
            if vr is not None:
                vr.SetVisibility(False)
            return
        vr = vrLogic.GetFirstVolumeRenderingDisplayNode(node) or vrLogic.CreateDefaultVolumeRenderingNodes(node)
        volumeProperty = vr.GetVolumePropertyNode().GetVolumeProperty()
        opacity = vtk.vtkPiecewiseFunction()
        opacity.AddPoint(0.0, 0.0)
        opacity.AddPoint(threshold, 0.0)
        opacity.AddPoint(1.0, 0.6)
        colors = vtk.vtkColorTransferFunction()
        colors.AddRGBPoint(threshold, 0.6, 0.0, 0.0)
        colors.AddRGBPoint(0.5 * (threshold + 1.0), 1.0, 0.45, 0.0)
        colors.AddRGBPoint(1.0, 1.0, 1.0, 0.4)
        volumeProperty.SetScalarOpacity(opacity)
        volumeProperty.SetColor(colors)
        vr.SetVisibility(True)


#
# SlicerHLIPTest
#


class SlicerHLIPTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Developer mode's Reload and Test, or ctest), offline: its volumes are made
    in the scene. The server round trip runs when HLIP_SERVER_URL names a running HLIP server, e.g.
    ``HLIP_SERVER_URL=http://127.0.0.1:8000 Slicer --python-code "..."``."""

    def setUp(self):
        """A cleared scene and a temporary folder."""
        slicer.mrmlScene.Clear(0)
        self.tempDir = tempfile.mkdtemp(prefix="SlicerHLIPTest-")

    def tearDown(self):
        """Delete the temporary folder."""
        shutil.rmtree(self.tempDir, ignore_errors=True)

    def runTest(self):
        """Every test of the module, each in a cleared scene."""
        for test in (self.test_VolumeIsWrittenWithItsGeometry, self.test_AnswerBecomesTableAndHeatmap, self.test_ServerRoundTrip):
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()

    def _sampleVolume(self, name="HLIPTest scan", shift=(0.0, 0.0, 0.0)):
        """A head-sized oblique, anisotropic scan (a bright ellipsoid in noise) made in the scene."""
        import numpy as np

        k, j, i = np.mgrid[0:24, 0:56, 0:48].astype("float32")
        ellipsoid = ((i - 24) / 18) ** 2 + ((j - 28) / 22) ** 2 + ((k - 12) / 9) ** 2 < 1
        voxels = (np.random.default_rng(0).normal(100, 10, ellipsoid.shape) + 400 * ellipsoid).astype("int16")
        angle = np.deg2rad(12.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = rotation @ np.diag([3.4, 3.1, 5.5])
        ijkToRas[:3, 3] = np.array([-80.0, -95.0, -60.0]) + np.array(shift)
        return slicer.util.addVolumeFromArray(voxels, ijkToRas, name)

    def _assertSameGrid(self, node, scan):
        """``node`` lies on ``scan``'s voxel grid: dimensions, spacing and IJK-to-RAS (1e-4 mm)."""
        self.assertEqual(node.GetImageData().GetDimensions(), scan.GetImageData().GetDimensions())
        for a, b in zip(node.GetSpacing(), scan.GetSpacing()):
            self.assertAlmostEqual(a, b, delta=1e-4)
        matrices = [vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()]
        node.GetIJKToRASMatrix(matrices[0])
        scan.GetIJKToRASMatrix(matrices[1])
        for r in range(3):
            for c in range(4):
                self.assertAlmostEqual(matrices[0].GetElement(r, c), matrices[1].GetElement(r, c), delta=1e-4)

    def _wait(self, task, seconds=900):
        """Run a BackgroundTask to its end while Slicer keeps processing events."""
        import time

        task.start()
        deadline = time.monotonic() + seconds
        while not task.done:
            self.assertLess(time.monotonic(), deadline, f"{task.name} took longer than {seconds} s")
            slicer.app.processEvents()
            time.sleep(0.02)
        return task.result()

    def test_VolumeIsWrittenWithItsGeometry(self):
        self.delayDisplay("A volume node becomes a NIfTI file with its geometry, with Slicer's own writer and reader")
        volume = self._sampleVolume()
        logic = SlicerHLIPLogic(MemorySettings())
        path = logic.writeVolumeFile(volume, os.path.join(self.tempDir, "volume.nii"))
        reloaded = logic.loadVolumeFile(path, "reloaded")
        self._assertSameGrid(reloaded, volume)
        self.assertTrue((slicer.util.arrayFromVolume(reloaded) == slicer.util.arrayFromVolume(volume)).all())
        slicer.mrmlScene.RemoveNode(reloaded)
        self.assertEqual([v.key for v in logic.sceneVolumes()], [volume.GetID()])
        self.assertEqual(logic.defaultSelection(logic.sceneVolumes()), [volume.GetID()])
        self.delayDisplay("Test passed")

    def test_AnswerBecomesTableAndHeatmap(self):
        self.delayDisplay("An answer becomes a findings table and a heat-map overlay on its scan")
        from SlicerHLIPLib import Answer, FindingRow, FindingsResult, HeatMap, read_header

        volume = self._sampleVolume()
        logic = SlicerHLIPLogic(MemorySettings())
        # a heat map in the scan's geometry, written as the server would: the scan scaled to [0, 1]
        heat = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, volume, "heat")
        voxels = slicer.util.arrayFromVolume(volume).astype("float32")
        slicer.util.updateVolumeFromArray(heat, voxels / max(float(voxels.max()), 1.0))
        path = logic.writeVolumeFile(heat, os.path.join(self.tempDir, "heatmap_0.nii.gz"))
        slicer.mrmlScene.RemoveNode(heat)
        rows = [FindingRow(0, "mass effect", 0.8, 0.1, "scan00", "scan00", "scan00.nii", "heatmap_0"),
                FindingRow(1, "midline shift", 0.3, -0.05, "scan00", "scan00", "scan00.nii", None)]
        result = FindingsResult("session", rows, {0: HeatMap("mass effect", path, read_header(path))}, [], 12.0, 0.5)
        answer = Answer(result, {0: volume.GetID(), 1: volume.GetID()}, {"scan00.nii": volume.GetName()})
        table = logic.showAnswer(answer, probabilityThreshold=0.5)
        self.assertTrue(logic.columnTitlesInHeader(table))  # no extra row of column names in the views
        self.assertEqual(table.GetNumberOfRows(), 2)
        self.assertEqual([table.GetColumnName(i) for i in range(table.GetNumberOfColumns())], [name for name, _ in TABLE_COLUMNS])
        self.assertEqual(table.GetCellText(0, 3), volume.GetName())
        self.assertEqual(table.GetCellText(0, 4), "above threshold")
        self.assertEqual(table.GetCellText(1, 4), "")
        node = logic.showHeatmap(0, opacity=0.4, threshold=0.3)
        self.assertIsNotNone(node)
        self._assertSameGrid(node, volume)  # the heat map lies on the scan's voxel grid
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), node.GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), volume.GetID())
        self.assertAlmostEqual(composite.GetForegroundOpacity(), 0.4)
        self.assertTrue(node.GetDisplayNode().GetApplyThreshold())
        self.assertAlmostEqual(node.GetDisplayNode().GetLowerThreshold(), 0.3)
        self.assertEqual(logic.parameter("SelectedFinding"), "mass effect")
        self.assertAlmostEqual(logic.parameter("HeatmapOpacity"), 0.4)
        self.assertIsNone(logic.showHeatmap(1))  # asked without a heat map
        logic.updateFlags(0.9)
        self.assertEqual(logic.findingsTableNode().GetCellText(0, 4), "")
        self.delayDisplay("Test passed")

    def test_ServerRoundTrip(self):
        url = os.environ.get("HLIP_SERVER_URL")
        if not url:
            self.delayDisplay("HLIP_SERVER_URL is not set: the server round trip was not run")
            logging.warning("SlicerHLIPTest: set HLIP_SERVER_URL to a running HLIP server to test the round trip")
            return
        self.delayDisplay(f"Round trip with the HLIP server at {url}")
        logic = SlicerHLIPLogic(MemorySettings())
        info = self._wait(logic.connectTask(url))
        self.assertTrue(info.model)
        volume = self._sampleVolume()
        second = self._sampleVolume("HLIPTest second scan", shift=(4.0, -3.0, 7.5))
        findings = ["mass effect", "midline shift"]
        answer = self._wait(logic.startQuestion([volume.GetID(), second.GetID()], findings, heatmaps=True, regionName="Brain MRI"))
        self.assertEqual([r.finding for r in answer.result.rows], findings)
        table = logic.showAnswer(answer)
        self.assertEqual(table.GetNumberOfRows(), len(findings))
        for row in range(len(findings)):
            scan = logic.scanNodeOf(row)
            self.assertIn(scan.GetID(), (volume.GetID(), second.GetID()))
            heat = logic.showHeatmap(row)
            self._assertSameGrid(heat, scan)  # the map Slicer read lies on its scan's grid
        found = self._wait(logic.searchTask("mass effect", 5))
        self.assertLessEqual(len(found.hits), 5)
        studies = self._wait(logic.studiesTask())
        if studies:  # a datastore study: downloaded, loaded, then asked by its id
            nodes = logic.loadDownloadedStudy(studies[0].study_id, self._wait(logic.downloadStudyTask(studies[0].study_id)))
            self.assertEqual(len(nodes), len(studies[0].scans))
            answer = self._wait(logic.startQuestion([n.GetID() for n in nodes], findings[:1], heatmaps=True))
            self.assertIsNone(answer.uploaded)  # asked by id: nothing uploaded
            self.assertEqual(answer.result.study_id, studies[0].study_id)
            logic.showAnswer(answer)
            self._assertSameGrid(logic.showHeatmap(0), logic.scanNodeOf(0))
        self.delayDisplay("Test passed")
