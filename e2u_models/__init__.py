"""What e2u does to a model: the ``e2u`` lm-eval model class, the embedded default model and the
method framework. Kept import-light: the start-up hook imports this package at every interpreter
start, so nothing here imports torch, transformers or lm-eval."""
