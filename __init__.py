"""The root of an mlilt checkout, not the mlilt package (that is ./mlilt/).

A script run from the folder that holds a checkout named ``mlilt`` imports this folder as
``mlilt``; without this file that is an empty namespace package, and the script fails later
with "module 'mlilt' has no attribute 'load'". The import fails here instead, saying why.
(Tools that import this folder under its own name, as pytest does, are let through.)
"""
import os as _os

if __name__ == "mlilt":
    raise ImportError(
        f"'import mlilt' found the checkout folder {_os.path.dirname(_os.path.abspath(__file__))}, not the "
        f"mlilt package inside it. Run from another folder or from inside the checkout, after "
        f"'pip install -e <checkout>'.")
