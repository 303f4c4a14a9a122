"""The library under the four recipe scripts, in layers; a lower one never imports a higher one:

    runtime/  errors, the process group, peak memory
    soup/     the soup math: pure functions on tensors
    files/    files on disk: checkpoints, ingredients, soups and recipes, results, state, locks
    archs/    architectures: the registry and its plug-ins (the one allowed import circle)
    run/      running a recipe: flags and setup, the MEHL step, evaluation, the frozen prefix
"""
