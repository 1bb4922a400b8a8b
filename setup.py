"""flexplugin: open 3D Variability Analysis and 3D Flex for Scipion, natively in PyTorch."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "flexplugin" / "version.py").read_text(), version)

setup(
    name="scipion-em-flexplugin",
    version=version["__version__"],
    description="Open 3D Variability Analysis and 3D Flex for Scipion, in PyTorch (no licence server)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="GPLv3",
    python_requires=">=3.9",
    packages=find_packages(include=["flexplugin", "flexplugin.*"]) + ["flexplugin.protocols"],
    package_dir={"flexplugin.protocols": "protocols"},
    package_data={"flexplugin": ["protocols.conf", "*.png"]},
    include_package_data=True,
    install_requires=[
        "scipion-pyworkflow>=3.11",
        "scipion-em>=3.11",
        # CPU or CUDA build by normal pip rules; `make` installs the tested 2.13.0
        "torch>=2.1",
        # scipion-em pins numpy 1.26.x and mrcfile <= 1.4.3
        "numpy>=1.26,<1.27",
        "mrcfile>=1.4,<=1.4.3",
        # teamtomo's field libraries (tested versions); see README "Conventions" for how we use them
        "torch-fourier-slice==0.6.0",
        "torch-ctf==0.6.0",
        "torch-fourier-shell-correlation==0.6.0",
        "starfile>=0.5.13,<0.6",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "pandas>=2.0",
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout"],
                    # cryoSPARC .cs particle files (engine/cryosparc_cs.py); reading falls back to NumPy
                    "cryosparc": ["cryosparc-tools>=4.4"]},
    entry_points={
        "pyworkflow.plugin": ["flexplugin = flexplugin"],
        "console_scripts": ["flexplugin = flexplugin.cli:main"],
    },
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering"],
)
