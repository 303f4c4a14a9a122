"""Running a recipe: the flags and the start every soup script shares (`cli`), what a learned soup
learns (`layout`), the MEHL step on a model (`mehl`), the BatchNorm rule (`batchnorm`), exact distributed
evaluation (`evaluation`), the ingredients' own accuracies (`individual`), and a frozen prefix run once
per data set (`prefix`). The top layer of utils: it uses every other."""
