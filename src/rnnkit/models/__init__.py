"""Generic models built from any registered recurrence."""

from rnnkit.models.model import BlockState, ModelConfig, ResidualBlock, ResidualStack, SequenceModel
from rnnkit.models.channel_mix import MLP_KINDS, ChannelMix
from rnnkit.models.wiring import model_config_for, seq2seq_config_for, task_io
from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig
from rnnkit.models.pointer import PointerConfig, PointerNetwork
from rnnkit.models.losses import seq2seq_loss, teacher_forcing_probability
from rnnkit.models.decoding import beam_search, greedy_decode, sample_decode
from rnnkit.models.io import load_pretrained

__all__ = [
    "MLP_KINDS", "BlockState", "ChannelMix", "ModelConfig", "PointerConfig", "PointerNetwork", "ResidualBlock", "ResidualStack", "Seq2Seq", "Seq2SeqConfig",
    "SequenceModel", "beam_search", "greedy_decode", "load_pretrained", "model_config_for", "sample_decode",
    "seq2seq_config_for", "seq2seq_loss", "task_io", "teacher_forcing_probability",
]
