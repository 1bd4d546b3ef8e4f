"""The built-in demo: a synthetic fine-grained car data set (:mod:`carclf.demo.synth`) and ``carclf demo``
(:mod:`carclf.demo.run`), which runs every step on it offline in minutes."""
