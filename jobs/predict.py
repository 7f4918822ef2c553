"""Label users' images with an exported model, over any number of processes or machines.

    accelerate launch jobs/predict.py INPUTS... --model artifacts/mnist/model.onnx --out preds.csv
    python jobs/predict.py INPUTS... --model artifacts/mnist/model.onnx --out preds.csv

Same options as `mnist-dist predict`; see --help.
"""
from mnist_dist.cli import predict

if __name__ == "__main__":
    predict(prog_name="jobs/predict.py")
