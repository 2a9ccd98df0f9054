"""The MLflow model of a bitlm checkpoint (logged by pipelines/tracking.py, "models from code").

``mlflow.pyfunc.load_model("models:/<name>/<version>").predict(["The return statement"])``
continues each prompt through bitlm's gated loop (64 bytes, temperature 0.8, the guide's gate)
and returns the texts; a blocked answer is an empty string. Serve and pipelines/evaluate.py
load the checkpoint itself from the model's ``artifacts/checkpoint``.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class BitLMModel(PythonModel):
    def load_context(self, context):
        from bitlm import BitTransformerLM

        self.model = BitTransformerLM.from_pretrained(context.artifacts["checkpoint"]).eval()

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from bitlm.gated import GateSettings, complete

        params = params or {}
        prompts = list(model_input)
        out = []
        for prompt in prompts:
            done = complete(
                self.model,
                str(prompt).encode("utf-8"),
                int(params.get("max_new_bytes", 64)),
                float(params.get("temperature", 0.8)),
                seed=params.get("seed"),
                gate=GateSettings(),
            )
            out.append(done.text)
        return out


mlflow.models.set_model(BitLMModel())
