"""The ``tarflow`` command: the composition root above the packages it composes (trainer, cluster, scaling,
data_pipeline). Each module here adds one command's parser and runs it; nothing in the project imports this
package. ``python -m tarflow ...`` is the same as ``tarflow ...`` (torchrun and the launchers use that form)."""
