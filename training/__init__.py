"""kdserve training: distil a ResNet teacher into ResNet18 students and export them for serving.

What serving must agree on (manifest schema, image preparation, model names, fusion, ONNX Runtime
settings) lives in the torch-free `kdcontract` package, which this one imports; serving never imports this.
"""
