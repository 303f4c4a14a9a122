"""The soup math: pure functions on tensors, sizes and names, free of files, devices and processes.
MEHL's hyperplane coefficients and gradient projection (`hyperplane`), Learned-Soup's softmax mixing
(`learned`), blocks of coefficients (`blocks`), ingredient and data sampling (`sampling`), learning-rate
schedules (`schedules`), and how far a soup went from its ingredients (`distance`). Imports nothing of
utils outside this package."""
