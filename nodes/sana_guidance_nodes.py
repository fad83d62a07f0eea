"""Sana guidance nodes: linear-attention PAG, and SANA-Sprint's TrigFlow SAMPLER / SIGMAS."""

from __future__ import annotations

from comfy_api.latest import io

from ..host.sana_pag import AUTO_LAYER, with_sana_pag
from ..host.sana_sprint import trigflow_sampler
from ..sampling.trigflow import trigflow_sigmas
from .queue_validation import VeloxNode

CATEGORY = "Velox/Sana"


class SanaPAG(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxSanaPAG",
            display_name="Sana Perturbed-Attention Guidance (Velox)",
            category=CATEGORY,
            description="PAG for Sana's linear attention: one extra pass per step with one block's "
            "self-attention replaced by identity (proj(V)), added after CFG as "
            "scale * (cond - perturbed). The official Sana app uses scale 2 with CFG 5.",
            inputs=[
                io.Model.Input("model", tooltip="A Sana model (not Sprint: it has no negative pass to pair with)."),
                io.Float.Input("scale", default=2.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="PAG strength; 0 disables it."),
                io.Int.Input("layer", default=AUTO_LAYER, min=AUTO_LAYER, max=127,
                             tooltip="Block whose self-attention is perturbed; -1 = the official one "
                             "(8 for 1.6B / 20 blocks, 14 for 0.6B / 28 blocks, else the middle block)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, layer) -> io.NodeOutput:
        return io.NodeOutput(with_sana_pag(model, scale, layer))


class TrigFlowSampler(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxTrigFlowSampler",
            display_name="SANA-Sprint TrigFlow Sampler (Velox)",
            category=CATEGORY,
            description="SANA-Sprint's consistency sampler (diffusers SCMScheduler) as a SAMPLER for core "
            "SamplerCustom / SamplerCustomAdvanced. Use CFG 1 and set the guidance with core FluxGuidance "
            "(Sprint embeds it), or use Velox Sampler's sprint presets, which do both.",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(trigflow_sampler())


class TrigFlowSigmas(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxTrigFlowSigmas",
            display_name="SANA-Sprint TrigFlow Sigmas (Velox)",
            category=CATEGORY,
            description="The official Sprint times (from pi/2; 2 steps: pi/2, 1.3, 0; else evenly spaced) "
            "as flow sigmas sin t / (sin t + cos t).",
            inputs=[io.Int.Input("steps", default=2, min=1, max=4, tooltip="Sprint is trained for 1 to 4 steps.")],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, steps) -> io.NodeOutput:
        return io.NodeOutput(trigflow_sigmas(steps))


SANA_GUIDANCE_NODES = [SanaPAG, TrigFlowSampler, TrigFlowSigmas]
