from pathlib import Path

import torch

from mnist_dist.model import ARCH, CNN, NUM_PARAMETERS, build_model, count_parameters


def test_parameter_count_matches_tutorial():
    assert count_parameters(CNN()) == NUM_PARAMETERS == 121_514


def test_layers_are_the_tutorials():
    model = CNN()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 16, (5, 5), (1, 1), (2, 2)),
        (16, 32, (5, 5), (1, 1), (2, 2)),
        (32, 32, (5, 5), (1, 1), (2, 2)),
        (32, 64, (5, 5), (1, 1), (2, 2)),
    ]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 2
    assert (model.out.in_features, model.out.out_features) == (64 * 7 * 7, 10)


def test_output_shape_for_any_batch():
    model = CNN().eval()
    for batch in (1, 7):
        assert model(torch.zeros(batch, 1, 28, 28)).shape == (batch, 10)


def test_config_rebuilds_an_identical_model():
    model = CNN()
    clone = build_model(model.config)
    clone.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), clone(x))
    assert model.config["arch"] == ARCH


def test_channels_last_gives_the_same_logits():
    model = CNN().eval()
    x = torch.rand(4, 1, 28, 28)
    fast = CNN().eval()
    fast.load_state_dict(model.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_model_module_imports_only_torch():
    import ast

    import mnist_dist.model as m

    tree = ast.parse(Path(m.__file__).read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import)]
    roots = {alias.name.split(".")[0] for node in imports for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert roots == {"torch"}
