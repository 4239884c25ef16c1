// ComfyUI-NVS front-end: shows the text a pack node returns in its "ui" (metrics tables, camera
// JSON) directly on the node, drawn below its widgets. Nothing is serialised into the workflow.
import { app } from "../../scripts/app.js";

const LINE_HEIGHT = 13;
const MAX_LINES = 24;
const MAX_CHARS = 96;

function wrapText(text) {
  const lines = [];
  for (const raw of String(text).split("\n")) {
    for (let i = 0; i < Math.max(raw.length, 1); i += MAX_CHARS) lines.push(raw.slice(i, i + MAX_CHARS));
  }
  if (lines.length > MAX_LINES) {
    const hidden = lines.length - MAX_LINES + 1;
    lines.length = MAX_LINES - 1;
    lines.push(`... (${hidden} more lines)`);
  }
  return lines;
}

app.registerExtension({
  name: "ComfyUI-NVS.TextOutput",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("NVS")) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (!message?.text?.length) return;
      this.nvsTextLines = wrapText(message.text.join("\n"));
      const base = this.computeSize();
      const width = Math.max(this.size[0], Math.min(7 * MAX_CHARS, 7 * Math.max(...this.nvsTextLines.map((l) => l.length))));
      this.nvsTextTop = base[1];
      this.setSize([width, base[1] + this.nvsTextLines.length * LINE_HEIGHT + 8]);
      app.graph?.setDirtyCanvas(true, true);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.nvsTextLines || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "11px monospace";
      ctx.fillStyle = "#cfd3da";
      let y = (this.nvsTextTop ?? this.computeSize()[1]) + LINE_HEIGHT;
      for (const line of this.nvsTextLines) {
        ctx.fillText(line, 8, y);
        y += LINE_HEIGHT;
      }
      ctx.restore();
    };
  },
});
