"""Layer 5, the commands: each a plain function of its typed config (train, train_rm, generate, evaluate, online,
rate, plot, report), importing the layers below and never another command. `iopo.cli` names them."""
