"""What the loops report beside the loss: training accuracy per task, validation loss per task; inference with flip TTA."""
import torch
from torch import nn

from artdist.train.engine import TrainState, count_predictions, run_inference, train_one_epoch
from artdist.train.loss import MultiTaskLoss

TASKS2 = ["style", "genre"]


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleDict({"style": nn.Linear(4, 3), "genre": nn.Linear(4, 2)})

    def forward(self, x):
        return {t: head(x) for t, head in self.heads.items()}

    def forward_features(self, x):
        return self(x), x


def _batches():
    torch.manual_seed(1)
    out = []
    for _ in range(4):
        x = torch.randn(8, 4)
        labels = torch.stack([torch.randint(0, 3, (8,)), torch.full((8,), -1), torch.randint(0, 2, (8,))], 1)
        labels[:3, 0] = -1  # some samples without a style label
        out.append((x, labels, torch.arange(8)))
    return out


def test_train_accuracy_counts_labelled_samples_and_eval_reports_mean_cross_entropy():
    model, batches = Linear(), _batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for group in optimizer.param_groups:
        group["base_lr"] = 0.0  # the weights stay put: the accuracy is that of this fixed model
    state = TrainState(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                       MultiTaskLoss(TASKS2, {t: None for t in TASKS2}, 0.0), lambda x: x, torch.device("cpu"))
    stats = train_one_epoch(state, iter(batches), steps=len(batches))
    with torch.no_grad():
        for i, task in ((0, "style"), (2, "genre")):
            logits = torch.cat([model(x)[task] for x, _, _ in batches])
            y = torch.cat([labels[:, i] for _, labels, _ in batches])
            known = y >= 0
            expected_acc = (logits.argmax(1)[known] == y[known]).double().mean().item()
            assert abs(stats["task_accuracy"][task] - expected_acc) < 1e-9, task
            result = count_predictions(model, batches, lambda x: x, torch.device("cpu"), None, TASKS2, {"style": 3, "genre": 2})
            mean_ce = nn.functional.cross_entropy(logits[known], y[known]).item()
            assert abs(result["loss_sum"][task] / int(known.sum()) - mean_ce) < 1e-6, task


def test_flip_tta_scores_each_sample_as_the_mean_of_it_and_its_mirror_image():
    model, batches, cpu = Linear(), _batches(), torch.device("cpu")
    plain = list(run_inference(model, batches, lambda x: x, cpu, None))
    mirrored = list(run_inference(model, [(x.flip(-1), y, i) for x, y, i in batches], lambda x: x, cpu, None))
    tta = list(run_inference(model, batches, lambda x: x, cpu, None, tta="flip"))
    assert len(tta) == len(plain)
    for (ids, labels, logits, emb), p, m in zip(tta, plain, mirrored):
        assert torch.equal(ids, p[0]) and torch.equal(labels, p[1])
        for task in TASKS2:  # sample by sample: a batch of both views split back in the wrong order fails here
            torch.testing.assert_close(logits[task], (p[2][task] + m[2][task]) / 2)
            assert not torch.allclose(logits[task], p[2][task])
        torch.testing.assert_close(emb, (p[3] + m[3]) / 2)
