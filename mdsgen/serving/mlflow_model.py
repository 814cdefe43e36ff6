"""The MLflow pyfunc flavour of an mdsgen generator, logged as "models from code": MLflow stores this
file and runs it to rebuild the model, so loading a registered model unpickles nothing. The weights are
the checkpoint folder in the model's artifacts (safetensors only).

    model = mlflow.pyfunc.load_model("models:/mdsgen@champion")
    model.predict(pandas.DataFrame({"video": ["clip.mp4"]}))  # -> columns sample_rate, wave
"""
import mlflow
import pandas as pd


class MDSGenModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from mdsgen.inference.generate import VideoToAudio

        self.generator = VideoToAudio(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        seed = int((params or {}).get("seed", 0))
        tracks = [self.generator.soundtrack(path, seed=seed) for path in model_input["video"]]
        return pd.DataFrame({"sample_rate": [t.sample_rate for t in tracks], "wave": [t.wave.tolist() for t in tracks]})


mlflow.models.set_model(MDSGenModel())
