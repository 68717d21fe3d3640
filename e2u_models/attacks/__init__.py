"""Recovery attacks: changes made to the edited or unlearned model after its method and before
evaluation, to ask whether the forgotten answers are gone or only hidden (``attack=`` model arg).

spec.py      AttackSpec: the ``attack*`` model args, parsed and checked before any model loads
quantize.py  ``attack=quantize``: group-wise round-to-nearest weight quantisation, in torch
relearn.py   ``attack=relearn``: a few fine-tuning steps with the shared training loop
run.py       the pipeline step: run the attack (or load it from the cache) and report it
"""
