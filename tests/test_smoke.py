def test_import():
    import fastlibra

    assert fastlibra.__version__
