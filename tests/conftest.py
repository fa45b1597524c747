import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import llmga_core` from the checkout

# Modules whose every test needs the real ComfyUI (in-process or a server). In other modules a test needs it when
# it uses the in-process fixtures below or carries @pytest.mark.host itself (a server it starts, the run command).
HOST_MODULES = {"test_host_server", "test_fault_matrix", "test_frontend", "test_memory", "test_long_prompt_host",
                "test_editing_node", "test_checkpoints_full_size", "test_mllm_nodes"}
HOST_FIXTURES = {"comfy_inprocess", "llmga_pack"}


def pytest_configure(config):
    config.addinivalue_line("markers", "host: needs the real ComfyUI (in-process or a server); the host-free "
                                       "library runs deselect these with -m 'not host'")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in HOST_MODULES or HOST_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.host)


@pytest.fixture(scope="session")
def comfy_inprocess():
    """The real host imported in this process (CPU); returns its folder_paths module."""
    from tests.host import import_host_inprocess

    return import_host_inprocess()


@pytest.fixture(scope="session")
def llmga_pack(comfy_inprocess):
    """This checkout imported by path as the host imports a custom node pack."""
    from tests.host import import_pack_inprocess

    return import_pack_inprocess()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's waits for a
    descheduled thread made tests up to 200x slower. (Servers the tests start are not affected.)"""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def original_tokenizers():
    """The original's tokenizer stack (transformers 4.41.2 in its own venv) answering over a pipe."""
    from tests.oracles import OriginalTokenizers

    oracle = OriginalTokenizers()
    yield oracle
    oracle.close()
