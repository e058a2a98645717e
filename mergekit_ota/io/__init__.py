"""The one I/O layer every command uses: nothing untrusted runs, nothing a user owns is lost.

===================  ==============================================================
``safetensors.py``   header and index parsing: offsets, dtypes, duplicates, containment
``handles.py``       the process-wide cache of open ``safe_open`` handles
``atomic.py``        temp-then-rename file writing with clean-up on every error path
``output.py``        claiming an output directory, the overwrite policy, build-then-swap
``paths.py``         path containment and the file names a model loader reads
``unpickle.py``      allow-listed unpickling: exact ``(module, qualname)`` pairs only
===================  ==============================================================
"""
