from clipjob import fs


def test_should_round_trip_an_object_when_the_loopback_s3_server_runs(s3_bucket):
    url = fs.join(s3_bucket, "a", "b.txt")
    fs.write_text(url, "hello")
    assert fs.read_text(url) == "hello"
    assert fs.ls(fs.join(s3_bucket, "a")) == ["b.txt"]
